"""DICOM reading (header, Hounsfield units with the RSNA fixes) and the image geometry shared by cache and masks."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pydicom
import pydicom.config
from pydicom.pixels import apply_modality_lut

from src.constants import AIR_HU, WINDOWS
from src.errors import InputError


class DicomError(InputError):
    """A DICOM file that cannot be used; `path` and `reason` are kept for the bad-files tables.

    The reason is always one line (decoder plugins raise multi-line messages) and at most MAX_REASON characters."""

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        self.path = str(path)
        self.reason = one_line(reason)
        super().__init__(f"{self.path}: {self.reason}")


MAX_REASON = 240


def one_line(text: object) -> str:
    """Whitespace (newlines included) folded to single spaces, cut to MAX_REASON characters."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= MAX_REASON else flat[: MAX_REASON - 3] + "..."


_F = TypeVar("_F", bound=Callable[..., Any])


def per_file(fn: _F) -> _F:
    """Decorate a reader whose first argument is the file: any exception but DicomError becomes a DicomError.

    One bad file among 752,803 must never stop a run: truncated files raise struct.error, zlib.error, EOFError,
    pydicom's BytesLengthException and the decoder plugins' own types, none of which a stage can list in advance."""

    @functools.wraps(fn)
    def wrapper(path: str | os.PathLike, *args: Any, **kwargs: Any) -> Any:
        try:
            # RSNA UIDs look like `ID_<hex>`, invalid for VR UI: validation would warn on every file.
            with pydicom.config.disable_value_validation():
                return fn(path, *args, **kwargs)
        except DicomError:
            raise
        except FileNotFoundError as err:
            raise DicomError(path, "file not found") from err
        except IsADirectoryError as err:
            raise DicomError(path, "is a folder, not a file") from err
        except Exception as err:  # the point: every other failure becomes a one-line reason
            raise DicomError(path, f"not a readable DICOM file: {type(err).__name__}: {err}") from err

    return wrapper  # type: ignore[return-value]


def _first(value: Any) -> Any:
    """Multi-valued elements (WindowCenter `00040\\00040` in about half the RSNA files): take the first."""
    if isinstance(value, (pydicom.multival.MultiValue, list, tuple)):
        return value[0] if len(value) else None
    return value


def _number(ds: pydicom.Dataset, keyword: str, default: Any, kind: Callable[[Any], Any]) -> Any:
    """The element as `kind` (int or float); absent, empty or unparsable values give the default."""
    value = _first(ds.get(keyword))
    if value is None or value == "":
        return default
    try:
        return kind(value)
    except (TypeError, ValueError):
        return default


def _float(ds: pydicom.Dataset, keyword: str, default: float) -> float:
    return _number(ds, keyword, default, float)


def _int(ds: pydicom.Dataset, keyword: str, default: int) -> int:
    return _number(ds, keyword, default, int)


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
    # per_file turns what dcmread raises (InvalidDicomError, EOFError, struct.error, zlib.error...) into DicomError.
    return pydicom.dcmread(path, stop_before_pixels=stop_before_pixels)


GRAYSCALE = ("MONOCHROME1", "MONOCHROME2")


def _check_image(ds: pydicom.Dataset, path: Path) -> None:
    """Refuse, with the reason, what is not one grayscale slice: colour, palette, multi-frame, no pixel matrix."""
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    if not photometric:
        raise DicomError(path, "no PhotometricInterpretation: not an image (e.g. a report, plan or DICOMDIR)")
    if photometric not in GRAYSCALE:
        raise DicomError(path, f"photometric interpretation {photometric} is not grayscale (MONOCHROME1/2 are read)")
    samples = _int(ds, "SamplesPerPixel", 1)
    if samples != 1:
        raise DicomError(path, f"SamplesPerPixel {samples}: not a grayscale image")
    frames = _int(ds, "NumberOfFrames", 1)
    if frames > 1:
        raise DicomError(path, f"multi-frame image ({frames} frames): one slice per file is read")
    if _int(ds, "Rows", 0) < 1 or _int(ds, "Columns", 0) < 1:
        raise DicomError(path, f"Rows x Columns {ds.get('Rows')} x {ds.get('Columns')}: no pixel matrix")


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


@per_file
def read_header(path: str | os.PathLike) -> dict[str, Any]:
    """Header fields the pipeline uses (no pixel data read); raises DicomError if position/orientation are missing
    or the file is not one grayscale slice (checks the geometry in src.data.geometry use)."""
    path = Path(path)
    ds = _read(path, stop_before_pixels=True)
    _check_image(ds, path)
    return _header(ds, path)


def _expected_bytes(ds: pydicom.Dataset) -> int:
    frames = _int(ds, "NumberOfFrames", 1) or 1
    samples = _int(ds, "SamplesPerPixel", 1) or 1
    bits = _int(ds, "BitsAllocated", 16)
    return (_int(ds, "Rows", 0) * _int(ds, "Columns", 0) * frames * samples * bits + 7) // 8


_PIXEL_TAGS = (b"\xe0\x7f\x10\x00", b"\x7f\xe0\x00\x10")  # (7FE0,0010) little / big endian
# Syntaxes whose frame is one JPEG, JPEG-LS or JPEG 2000 / HTJ2K codestream: all end with the marker FFD9 (EOI; EOC
# in JPEG 2000). Decoders return an image from a codestream cut short, so completeness is checked here.
_JPEG_FAMILY = "1.2.840.10008.1.2.4."
_END_MARKER = b"\xff\xd9"


def _check_codestream(ds: pydicom.Dataset, path: Path, syntax: pydicom.uid.UID) -> None:
    """A compressed single frame must be complete: the codestream's end marker is there (before item padding)."""
    if not str(syntax).startswith(_JPEG_FAMILY):
        return  # RLE and deflate decode strictly: a short segment or stream raises
    fragments = list(pydicom.encaps.generate_fragments(ds.PixelData))[1:]  # the first item is the offset table
    tail = b"".join(fragments[-2:]).rstrip(b"\x00\xff")  # items are padded to even length (00, or FF fill)
    if not fragments or not tail.endswith(_END_MARKER):
        name = getattr(syntax, "name", str(syntax))
        raise DicomError(path, f"compressed transfer syntax {name} ({syntax}): image data incomplete, no end marker")


def _pixels(ds: pydicom.Dataset, path: Path) -> np.ndarray:
    _check_image(ds, path)
    if "PixelData" not in ds:
        raw = path.read_bytes()
        if any(tag in raw[132:] for tag in _PIXEL_TAGS):
            raise DicomError(path, "file ends inside the PixelData element (truncated)")
        raise DicomError(path, "no PixelData element")
    syntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    compressed = syntax is not None and syntax.is_compressed
    if compressed:
        _check_codestream(ds, path, syntax)
    else:
        # pydicom would raise a bare ValueError here (the real corrupt ID_6431af929); say what is wrong instead.
        have, want = len(ds.PixelData), _expected_bytes(ds)
        if have < want:
            raise DicomError(path, f"pixel data too short: {have} bytes, expected {want}")
    try:
        arr = ds.pixel_array
    except Exception as err:  # decoder plugins raise many types (ValueError, RuntimeError, their own)
        first = one_line(str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__)
        if compressed:
            name = getattr(syntax, "name", str(syntax))
            raise DicomError(path, f"compressed transfer syntax {name} ({syntax}) cannot be decoded: {first}") from err
        raise DicomError(path, f"pixel data cannot be decoded: {type(err).__name__}: {first}") from err
    if arr.ndim != 2:
        raise DicomError(path, f"expected one grayscale frame, got pixel array of shape {arr.shape}")
    return arr


@per_file
def read_hu(path: str | os.PathLike) -> np.ndarray:
    """float32 [rows, cols] in Hounsfield units (pydicom's modality LUT output, with the RSNA 12-bit fix and padding
    as air); raises DicomError with a one-line reason, never zeros."""
    path = Path(path)
    return _hu(_read(path, stop_before_pixels=False), path)


def _hu(ds: pydicom.Dataset, path: Path) -> np.ndarray:
    stored = _pixels(ds, path)
    key = _rescale_key(ds)
    if ds.get("ModalityLUTSequence"):
        # A lookup table instead of slope/intercept (rare in CT): pydicom applies it; padding still maps to air.
        hu = apply_modality_lut(stored, ds).astype(np.float32)
        return np.where(_padding_mask(stored, *key[5:]), np.float32(AIR_HU), hu) if key[5] is not None else hu
    # int32/int64 first: pydicom 3 + NumPy 2 raise OverflowError when a negative int meets a uint16 array.
    return _stored_to_hu(stored.astype(np.int64 if stored.itemsize >= 4 else np.int32), *key)


RescaleKey = tuple[float, float, int, bool, bool, "int | None", "int | None"]


def _rescale_key(ds: pydicom.Dataset) -> RescaleKey:
    """(slope, intercept, BitsStored, signed, 12-bit fix, padding low, padding high): all that maps stored -> HU."""
    # pydicom rescales only when both are present (the standard makes them a pair); otherwise the identity.
    both = "RescaleSlope" in ds and "RescaleIntercept" in ds
    slope = _float(ds, "RescaleSlope", 1.0) if both else 1.0
    intercept = _float(ds, "RescaleIntercept", 0.0) if both else 0.0
    bits = _int(ds, "BitsStored", 16)
    signed = _int(ds, "PixelRepresentation", 0) == 1
    modality = str(ds.get("Modality", "")).strip().upper()
    fix = not ds.get("ModalityLUTSequence") and _needs_12bit_fix(intercept, bits, signed, modality)
    low, high = _padding(ds, bits, signed)
    return slope, intercept, bits, signed, fix, low, high


def _as_stored(value: int, bits: int, signed: bool) -> int:
    """A header integer (US or SS, RSNA writes -2000 either way) as pydicom's pixel_array shows stored values."""
    value = int(value) & ((1 << bits) - 1)
    return value - (1 << bits) if signed and value >= 1 << (bits - 1) else value


def _padding(ds: pydicom.Dataset, bits: int, signed: bool) -> tuple[int | None, int | None]:
    """PixelPaddingValue [and PixelPaddingRangeLimit] as a closed range of stored values, or (None, None)."""
    value = _first(ds.get("PixelPaddingValue"))
    if value is None or value == "" or not 1 <= bits <= 32:
        return None, None
    try:
        low = _as_stored(int(value), bits, signed)
        limit = _first(ds.get("PixelPaddingRangeLimit"))
        high = low if limit is None or limit == "" else _as_stored(int(limit), bits, signed)
    except (TypeError, ValueError):
        return None, None
    return min(low, high), max(low, high)


def _padding_mask(px: np.ndarray, low: int | None, high: int | None) -> np.ndarray | bool:
    if low is None or high is None:
        return False
    return (px >= low) & (px <= high)


def _stored_to_hu(
    px: np.ndarray, slope: float, intercept: float, bits: int, signed: bool, fix12: bool,
    pad_low: int | None = None, pad_high: int | None = None,
) -> np.ndarray:  # fmt: skip
    """int32 stored values (as pydicom's pixel_array gives them) -> float32 HU; elementwise, so it also builds LUTs.

    MONOCHROME1 is not inverted: Rescale Slope/Intercept give HU whatever the photometric interpretation (PS3.3
    C.11.1.1.2); MONOCHROME1 only tells a viewer to display low values white, and the windows here are in HU."""
    padded = _padding_mask(px, pad_low, pad_high)
    if fix12:
        # RSNA 2019 fault (~0.8% of images, found in the public fastai/appian42 notebooks): CT, stored value = HU mod
        # 4096 with intercept 0 or 1, so air (-1000 HU) reads 3096. Unwrap into [-1000, 3095] (x slope): pixels + 1000,
        # wrap, and an intercept of -1000 scaled by the slope so that slope != 1 does not shift every pixel.
        px = px + 1000
        px[px >= 4096] -= 4096
        intercept = -1000.0 * slope
    if slope == 1.0 and float(intercept).is_integer():
        hu = (px + int(intercept)).astype(np.float32)  # exact in integers, as pydicom's float64 then float32
    else:
        hu = (px.astype(np.float64) * slope + intercept).astype(np.float32)  # pydicom's float64 arithmetic
    if padded is not False:
        hu[padded] = AIR_HU  # PixelPaddingValue marks pixels outside the scanned field (e.g. -2000): air, not data
    return hu


def _needs_12bit_fix(intercept: float, bits: int, signed: bool, modality: str = "CT") -> bool:
    return modality == "CT" and bits == 12 and not signed and intercept > -100
