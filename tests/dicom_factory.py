"""Crafts small RSNA-like DICOM files with pydicom for tests (header fields as in the stage-2 data)."""

from __future__ import annotations

import functools
import io
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pydicom
import pydicom.config
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import UID, ExplicitVRLittleEndian, JPEGBaseline8Bit, RLELossless, generate_uid

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def tilted_orientation(degrees: float) -> tuple[float, ...]:
    """Gantry tilt about the patient x axis: rows stay along x, columns tilt in the y-z plane."""
    t = np.deg2rad(degrees)
    return (1.0, 0.0, 0.0, 0.0, float(np.cos(t)), float(-np.sin(t)))


def _without_validation(fn: Callable) -> Callable:
    """RSNA-style `ID_...` UIDs are not valid VR UI values; pydicom would warn on every element."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with pydicom.config.disable_value_validation():
            return fn(*args, **kwargs)

    return wrapper


@_without_validation
def make_dicom(
    path: str | Path,
    pixels: np.ndarray,
    *,
    image_id: str | None = None,
    patient: str = "ID_patient0",
    study: str = "ID_study0",
    series: str = "ID_series0",
    position: Sequence[float] = (0.0, 0.0, 0.0),
    orientation: Sequence[float] = AXIAL,
    pixel_spacing: Sequence[float] = (0.5, 0.5),
    slope: float = 1.0,
    intercept: float = -1024.0,
    bits_stored: int = 16,
    signed: bool = True,
    photometric: str = "MONOCHROME2",
    window_center: str | Sequence[str] = ("00040", "00040"),
    window_width: str | Sequence[str] = ("00080", "00080"),
    truncate_to: int | None = None,
    syntax: str = "explicit",
    with_position: bool = True,
) -> Path:
    """Write a single-frame CT slice; `pixels` are the stored values. syntax: explicit | rle | jpeg-baseline."""
    path = Path(path)
    image_id = image_id or path.stem
    pixels = np.asarray(pixels)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(CT_IMAGE_STORAGE)
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CT_IMAGE_STORAGE
    ds.SOPInstanceUID = image_id
    ds.Modality = "CT"
    ds.PatientID = patient
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = series
    ds.StudyID = ""
    if with_position:
        ds.ImagePositionPatient = [f"{v:.6f}" for v in position]
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in orientation]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows, ds.Columns = int(pixels.shape[0]), int(pixels.shape[1])
    ds.PixelSpacing = [f"{v:.6f}" for v in pixel_spacing]
    ds.WindowCenter = window_center if isinstance(window_center, str) else list(window_center)
    ds.WindowWidth = window_width if isinstance(window_width, str) else list(window_width)
    ds.RescaleIntercept = f"{intercept:g}"
    ds.RescaleSlope = f"{slope:g}"

    if syntax == "jpeg-baseline":
        # Pillow encodes 8-bit baseline JPEG; the pydicom/pylibjpeg decoders must read it back.
        ds.BitsAllocated = ds.BitsStored = 8
        ds.HighBit = 7
        ds.PixelRepresentation = 0
        buf = io.BytesIO()
        Image.fromarray(pixels.astype(np.uint8), mode="L").save(buf, format="JPEG", quality=95)
        ds.PixelData = encapsulate([buf.getvalue()])
        ds["PixelData"].VR = "OB"
        meta.TransferSyntaxUID = JPEGBaseline8Bit
        ds.save_as(path, enforce_file_format=True)
        return path

    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 1 if signed else 0
    stored = pixels.astype(np.int16 if signed else np.uint16)
    if syntax == "rle":
        ds.compress(RLELossless, stored)
    elif syntax == "explicit":
        data = stored.tobytes()
        ds.PixelData = data[:truncate_to] if truncate_to is not None else data
        ds["PixelData"].VR = "OW"
    else:
        raise ValueError(f"unknown syntax {syntax}")
    ds.save_as(path, enforce_file_format=True)
    return path


@_without_validation
def set_transfer_syntax(path: str | Path, uid: str, fragment: bytes) -> Path:
    """Rewrite a file as if encapsulated in `uid` with a given (e.g. garbage) fragment: for undecodable files."""
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = UID(uid)
    ds.PixelData = encapsulate([fragment])
    ds["PixelData"].VR = "OB"
    ds.save_as(path, enforce_file_format=True)
    return Path(path)
