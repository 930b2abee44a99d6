"""DICOM reading (header, Hounsfield units with the RSNA fixes) and the image geometry shared by cache and masks."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pydicom
import pydicom.config
from pydicom.errors import InvalidDicomError

from src.constants import AIR_HU, WINDOWS
from src.errors import InputError


class DicomError(InputError):
    """A DICOM file that cannot be used; `path` and `reason` are kept for the bad-files tables."""

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


def _first(value: Any) -> Any:
    """Multi-valued elements (WindowCenter `00040\\00040` in about half the RSNA files): take the first."""
    if isinstance(value, (pydicom.multival.MultiValue, list, tuple)):
        return value[0] if len(value) else None
    return value


def _float(ds: pydicom.Dataset, keyword: str, default: float) -> float:
    value = _first(ds.get(keyword))
    if value is None or value == "":
        return default
    try:
        return float(value)
    except (TypeError, ValueError):
        return default


def _int(ds: pydicom.Dataset, keyword: str, default: int) -> int:
    value = _first(ds.get(keyword))
    if value is None or value == "":
        return default
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


def _floats(ds: pydicom.Dataset, keyword: str, n: int, path: Path, default: tuple[float, ...] | None = None) -> tuple:
    value = ds.get(keyword)
    if value is None or value == "":
        if default is None:
            raise DicomError(path, f"missing {keyword}")
        return default
    try:
        values = tuple(float(v) for v in value)
    except (TypeError, ValueError) as err:
        raise DicomError(path, f"{keyword} is not numeric: {value!r} ({err})") from err
    if len(values) != n:
        if default is None:
            raise DicomError(path, f"{keyword} has {len(values)} values, expected {n}")
        return default
    return values


def _read(path: Path, stop_before_pixels: bool) -> pydicom.Dataset:
    try:
        return pydicom.dcmread(path, stop_before_pixels=stop_before_pixels)
    except FileNotFoundError as err:
        raise DicomError(path, "file not found") from err
    except (InvalidDicomError, EOFError, OSError, ValueError, KeyError, TypeError) as err:
        raise DicomError(path, f"not a readable DICOM file: {type(err).__name__}: {err}") from err


def _header(ds: pydicom.Dataset, path: Path) -> dict[str, Any]:
    meta = getattr(ds, "file_meta", None)
    syntax = str(meta.get("TransferSyntaxUID", "")) if meta is not None else ""
    return {
        "ID": str(ds.get("SOPInstanceUID") or "") or path.stem,
        "PatientID": str(ds.get("PatientID", "")),
        "StudyInstanceUID": str(ds.get("StudyInstanceUID", "")),
        "SeriesInstanceUID": str(ds.get("SeriesInstanceUID", "")),
        "ImagePositionPatient": _floats(ds, "ImagePositionPatient", 3, path),
        "ImageOrientationPatient": _floats(ds, "ImageOrientationPatient", 6, path),
        # RSNA files always carry PixelSpacing; 1 mm keeps a foreign file usable (volumes are then in voxels).
        "PixelSpacing": _floats(ds, "PixelSpacing", 2, path, default=(1.0, 1.0)),
        "Rows": _int(ds, "Rows", 0),
        "Columns": _int(ds, "Columns", 0),
        "RescaleSlope": _float(ds, "RescaleSlope", 1.0),
        "RescaleIntercept": _float(ds, "RescaleIntercept", 0.0),
        "BitsStored": _int(ds, "BitsStored", 16),
        "PixelRepresentation": _int(ds, "PixelRepresentation", 0),
        "PhotometricInterpretation": str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper(),
        "WindowCenter": _float(ds, "WindowCenter", WINDOWS[0][1]),
        "WindowWidth": _float(ds, "WindowWidth", WINDOWS[0][2]),
        "TransferSyntaxUID": syntax,
    }


def read_header(path: str | os.PathLike) -> dict[str, Any]:
    """Header fields the pipeline uses (no pixel data read); raises DicomError if position/orientation are missing."""
    path = Path(path)
    # RSNA UIDs look like `ID_<hex>`, invalid for VR UI: validation would warn on every file.
    with pydicom.config.disable_value_validation():
        return _header(_read(path, stop_before_pixels=True), path)


def _expected_bytes(ds: pydicom.Dataset) -> int:
    frames = _int(ds, "NumberOfFrames", 1) or 1
    samples = _int(ds, "SamplesPerPixel", 1) or 1
    bits = _int(ds, "BitsAllocated", 16)
    return (_int(ds, "Rows", 0) * _int(ds, "Columns", 0) * frames * samples * bits + 7) // 8


def _pixels(ds: pydicom.Dataset, path: Path) -> np.ndarray:
    if "PixelData" not in ds:
        raise DicomError(path, "no PixelData element")
    syntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    compressed = syntax is not None and syntax.is_compressed
    if not compressed:
        # pydicom would raise a bare ValueError here (the real corrupt ID_6431af929); say what is wrong instead.
        have, want = len(ds.PixelData), _expected_bytes(ds)
        if have < want:
            raise DicomError(path, f"pixel data too short: {have} bytes, expected {want}")
    try:
        arr = ds.pixel_array
    except Exception as err:  # decoder plugins raise many types (ValueError, RuntimeError, their own)
        if compressed:
            name = getattr(syntax, "name", str(syntax))
            raise DicomError(path, f"compressed transfer syntax {name} ({syntax}) cannot be decoded: {err}") from err
        raise DicomError(path, f"pixel data cannot be decoded: {type(err).__name__}: {err}") from err
    if arr.ndim != 2:
        raise DicomError(path, f"expected one grayscale frame, got pixel array of shape {arr.shape}")
    return arr


def read_hu(path: str | os.PathLike) -> np.ndarray:
    """float32 [rows, cols] in Hounsfield units, with the RSNA 12-bit intercept fix; raises DicomError, never zeros."""
    path = Path(path)
    with pydicom.config.disable_value_validation():
        ds = _read(path, stop_before_pixels=False)
        return _hu(ds, path)


def _hu(ds: pydicom.Dataset, path: Path) -> np.ndarray:
    # int32 first: pydicom 3 + NumPy 2 raise OverflowError when a negative int meets a uint16 array.
    return _stored_to_hu(_pixels(ds, path).astype(np.int32), *_rescale_key(ds))


def _rescale_key(ds: pydicom.Dataset) -> tuple[float, float, int, bool, bool]:
    """(slope, intercept, BitsStored, signed, MONOCHROME1): all that maps a stored value to HU."""
    return (
        _float(ds, "RescaleSlope", 1.0),
        _float(ds, "RescaleIntercept", 0.0),
        _int(ds, "BitsStored", 16),
        _int(ds, "PixelRepresentation", 0) == 1,
        str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip() == "MONOCHROME1",
    )


def _stored_to_hu(px: np.ndarray, slope: float, intercept: float, bits: int, signed: bool, mono1: bool) -> np.ndarray:
    """int32 stored values (as pydicom's pixel_array gives them) -> float32 HU; elementwise, so it also builds LUTs."""
    if mono1:
        # MONOCHROME1 stores inverted grey levels (minimum = white). Mirror the stored values within their range
        # so that high HU is dense again before the rescale; CT in MONOCHROME1 is rare (none in RSNA), but files
        # re-exported from viewers exist. Strictly, PS3.3 C.7.6.3.1.2 inverts after the VOI LUT; inverting the
        # stored values is what matters for a model that windows HU itself.
        px = (-1 - px) if signed else ((1 << bits) - 1 - px)
    if _needs_12bit_fix(intercept, bits, signed):
        # RSNA 2019 fault (~0.8% of images, found in the public fastai/appian42 notebooks): stored value = HU mod 4096
        # with intercept 0 or 1, so air (-1000 HU) reads 3096. Unwrap into [-1000, 3095] HU.
        px = px + 1000
        px[px >= 4096] -= 4096
        intercept = -1000.0
    hu = px.astype(np.float32) * np.float32(slope) + np.float32(intercept)
    return hu


def _needs_12bit_fix(intercept: float, bits: int, signed: bool) -> bool:
    return bits == 12 and not signed and intercept > -100


def pad_to_square(hu: np.ndarray, fill: float = AIR_HU) -> np.ndarray:
    """Centre a [H, W] image on a square canvas filled with `fill` (air by default; 0 HU would be water)."""
    h, w = hu.shape[:2]
    side = max(h, w)
    if h == w:
        return hu
    out = np.full((side, side, *hu.shape[2:]), fill, dtype=hu.dtype)
    top, left = (side - h) // 2, (side - w) // 2
    out[top : top + h, left : left + w] = hu
    return out


def resize(img: np.ndarray, size: int, nearest: bool = False) -> np.ndarray:
    """Square image to [size, size]: area averaging when shrinking, bilinear when enlarging, or exact nearest."""
    if img.shape[0] == size and img.shape[1] == size:
        return img
    if nearest:
        interp = cv2.INTER_NEAREST_EXACT  # plain INTER_NEAREST samples half a pixel off the other modes' grid
    elif size < img.shape[0]:
        interp = cv2.INTER_AREA
    else:
        interp = cv2.INTER_LINEAR
    return cv2.resize(img, (size, size), interpolation=interp)


def window(hu: np.ndarray, center: float, width: float) -> np.ndarray:
    """Linear CT window: center - width/2 -> 0, center + width/2 -> 1, clipped; float32."""
    low = center - width / 2.0
    return np.clip((np.asarray(hu, dtype=np.float32) - np.float32(low)) / np.float32(width), 0.0, 1.0)


def to_channels(hu: np.ndarray, size: int) -> np.ndarray:
    """HU -> pad with air -> resize -> the constants.WINDOWS channels -> uint8 [3, size, size]."""
    img = resize(pad_to_square(hu.astype(np.float32, copy=False)), size)
    out = np.empty((len(WINDOWS), *img.shape), dtype=np.uint8)
    _windows_u8(img, out)
    return out


_LOW = np.array([c - w / 2.0 for _, c, w in WINDOWS], dtype=np.float32)
_WIDTH = np.array([w for _, _, w in WINDOWS], dtype=np.float32)


def _windows_u8(img: np.ndarray, out: np.ndarray) -> None:
    """out[i] = rint(window(img, WINDOWS[i]) * 255) as uint8: window()'s float32 steps, all channels at once."""
    shape = (len(WINDOWS),) + (1,) * img.ndim
    buf = np.subtract(img, _LOW.reshape(shape))
    np.divide(buf, _WIDTH.reshape(shape), out=buf)
    np.clip(buf, 0.0, 1.0, out=buf)
    np.multiply(buf, np.float32(255.0), out=buf)
    np.rint(buf, out=buf)
    out[...] = buf


def mask_to_size(mask: np.ndarray, size: int) -> np.ndarray:
    """Blood mask (nonzero = blood) through the image's geometry (centred pad, same resize grid) -> uint8 {0, 1}."""
    binary = (np.asarray(mask) > 0).astype(np.float32)
    # Area-average then threshold at half coverage: same pixel grid as the image resize, unlike INTER_NEAREST.
    scaled = resize(pad_to_square(binary, fill=0.0), size)
    return (scaled >= 0.5).astype(np.uint8)
