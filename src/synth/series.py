"""One synthetic series and its slices as DICOM datasets: the storage formats of the real data, 12-bit bug included."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


@dataclass
class Series:
    """One study's single series: ids, geometry, storage format and the rendered slices."""

    patient: str
    study: str
    series: str
    split: str
    image_ids: list[str]
    positions: np.ndarray  # [n, 3] ImagePositionPatient (mm)
    orientation: np.ndarray  # [6] ImageOrientationPatient
    pixel_spacing: tuple[float, float]  # (row, col) mm
    slice_spacing: float
    hu: np.ndarray  # [n, rows, cols] int16
    blood: np.ndarray  # [n, rows, cols] int8 subtype index, -1 = none
    storage: str  # "int16", "uint12" or "bug12" (the 12-bit intercept bug)
    window_two_valued: bool
    extra_tags: bool  # InstanceNumber + SliceThickness present (most files lack them)


def _stored_pixels(hu: np.ndarray, storage: str) -> tuple[np.ndarray, int, int, int, float]:
    """(stored array, BitsStored, PixelRepresentation, ..., RescaleIntercept) for one storage format."""
    if storage == "int16":
        return (hu.astype(np.int32) + 1024).astype(np.int16), 16, 1, 15, -1024.0
    if storage == "uint12":
        return np.clip(hu.astype(np.int32) + 1024, 0, 4095).astype(np.uint16), 12, 0, 11, -1024.0
    # The real 12-bit bug: intercept 0 or 1 but stored = HU mod 4096 (air -1000 reads 3096); valid for HU >= -1000.
    stored = np.mod(np.clip(hu.astype(np.int32), -1000, 3095), 4096).astype(np.uint16)
    return stored, 12, 0, 11, 0.0


def dicom_dataset(s: Series, k: int, bug_intercept: float) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
    meta.MediaStorageSOPInstanceUID = s.image_ids[k]
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    stored, bits, rep, high, intercept = _stored_pixels(s.hu[k], s.storage)
    if s.storage == "bug12":
        intercept = bug_intercept
    ds.SOPInstanceUID = s.image_ids[k]
    ds.Modality = "CT"
    ds.PatientID = s.patient
    ds.StudyInstanceUID = s.study
    ds.SeriesInstanceUID = s.series
    ds.StudyID = ""
    ds.ImagePositionPatient = [f"{v:.6g}" for v in s.positions[k]]
    ds.ImageOrientationPatient = [f"{v:.6g}" for v in s.orientation]
    if s.extra_tags:
        ds.InstanceNumber = k + 1
        ds.SliceThickness = f"{s.slice_spacing:.6g}"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = stored.shape
    ds.PixelSpacing = [f"{v:.9g}" for v in s.pixel_spacing]
    ds.BitsAllocated = 16
    ds.BitsStored = bits
    ds.HighBit = high
    ds.PixelRepresentation = rep
    ds.WindowCenter = ["00040", "00040"] if s.window_two_valued else "40"
    ds.WindowWidth = ["00080", "00080"] if s.window_two_valued else "80"
    ds.RescaleIntercept = f"{intercept:.0f}"
    ds.RescaleSlope = "1"
    ds.PixelData = stored.tobytes()
    return ds
