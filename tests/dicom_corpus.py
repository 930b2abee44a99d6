"""Real-world DICOM corpus (pydicom's test files, pydicom-data, crafted edits, truncations) judged against pydicom.

Shared by tests/test_dicom_corpus.py and bench/dicom_corpus.py. The reference is plain pydicom:
`apply_modality_lut(ds.pixel_array, ds)` for single-frame grayscale files, with the project's two deliberate
differences applied to it: the RSNA 12-bit fix (CT, 12 bits unsigned, intercept > -100: the reference is
apply_modality_lut of the unwrapped stored values with the intercept -1000 x slope) and PixelPaddingValue -> air.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pydicom.config
import pydicom.data
from pydicom.pixels import apply_modality_lut

from src.constants import AIR_HU
from src.data.dicom import DicomError, read_header, read_hu
from src.data.dicom_fast import read_channels
from src.data.metadata import _header_row
from src.data.windows import to_channels
from src.triage.inputs import load_study_files

CHANNEL_SIZE = 64  # the fast path resizes; small keeps big radiographs cheap
READERS = ("header", "metadata", "hu", "fast", "triage")


def real_files() -> list[Path]:
    """Every file of pydicom's test data and of the pydicom-data package (DICOM or not), sorted by path."""
    import data_store  # the pydicom-data package

    roots = [Path(pydicom.data.__file__).parent / "test_files", Path(data_store.__file__).parent / "data"]
    return sorted(p for root in roots for p in root.rglob("*") if p.is_file() and p.suffix not in (".py", ".pyc"))


@dataclass
class Reference:
    """What plain pydicom makes of a file: HU (with the project's fixes) or why it is not one grayscale slice."""

    hu: np.ndarray | None
    why: str = ""
    syntax: str = ""
    photometric: str = ""
    bits: str = ""


def _describe(ds: pydicom.Dataset) -> tuple[str, str, str]:
    meta = getattr(ds, "file_meta", None)
    syntax = meta.get("TransferSyntaxUID", "") if meta is not None else ""
    name = getattr(syntax, "name", str(syntax)) if syntax else "-"
    bits = f"{ds.get('BitsStored', '-')}/{ds.get('BitsAllocated', '-')}"
    return name, str(ds.get("PhotometricInterpretation", "-")), bits


def reference(path: Path) -> Reference:
    with warnings.catch_warnings(), pydicom.config.disable_value_validation():
        warnings.simplefilter("ignore")
        try:
            ds = pydicom.dcmread(path)
        except Exception as err:
            return Reference(None, f"dcmread: {type(err).__name__}")
        syntax, photometric, bits = _describe(ds)
        ref = Reference(None, "", syntax, photometric, bits)
        frames = ds.get("NumberOfFrames")
        if photometric not in ("MONOCHROME1", "MONOCHROME2") or ds.get("SamplesPerPixel", 1) != 1:
            ref.why = "not grayscale"
        elif str(frames).strip().isdigit() and int(frames) > 1:
            ref.why = "multi-frame"
        elif "PixelData" not in ds:
            ref.why = "no PixelData"
        if ref.why:
            return ref
        try:
            stored = ds.pixel_array
        except Exception as err:
            ref.why = f"pixel_array: {type(err).__name__}"
            return ref
        if stored.ndim != 2:
            ref.why = f"pixel_array shape {stored.shape}"
            return ref
        ref.hu = _reference_hu(ds, stored)
        return ref


def _reference_hu(ds: pydicom.Dataset, stored: np.ndarray) -> np.ndarray:
    bits, signed = int(ds.get("BitsStored", 16)), ds.get("PixelRepresentation", 0) == 1
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
    if (
        str(ds.get("Modality", "")).upper() == "CT" and bits == 12 and not signed and intercept > -100
        and not ds.get("ModalityLUTSequence")
    ):  # fmt: skip
        # RSNA 12-bit fix, documented difference: pydicom's modality LUT of the unwrapped values.
        slope = float(ds.get("RescaleSlope", 1) or 1)
        fixed = stored.astype(np.int32) + 1000
        fixed[fixed >= 4096] -= 4096
        ds = copy.deepcopy(ds)
        ds.RescaleSlope, ds.RescaleIntercept = slope, -1000.0 * slope
        hu = apply_modality_lut(fixed, ds).astype(np.float32)
    else:
        hu = np.asarray(apply_modality_lut(stored, ds)).astype(np.float32)
    pad = ds.get("PixelPaddingValue")
    if pad is not None:
        # Padding -> air, documented difference; the value compared as pydicom shows stored values (masked bits).
        def as_stored(v: int) -> int:
            v = int(v) & ((1 << bits) - 1)
            return v - (1 << bits) if signed and v >= 1 << (bits - 1) else v

        limit = ds.get("PixelPaddingRangeLimit", pad)
        low, high = sorted((as_stored(pad), as_stored(limit)))
        hu[(stored >= low) & (stored <= high)] = AIR_HU
    return hu


@dataclass
class Outcome:
    kind: str  # exact | close | read | refused | WRONG | ERROR
    detail: str = ""


def _refused_ok(err: DicomError, path: Path) -> bool:
    message = str(err)
    return "\n" not in message and "\r" not in message and message.startswith(str(path)) and bool(err.reason)


def _judge(path: Path, fn: Callable[[], np.ndarray | None], expected: np.ndarray | None, tol: float = 0) -> Outcome:
    try:
        got = fn()
    except DicomError as err:
        if _refused_ok(err, path):
            return Outcome("refused", err.reason)
        return Outcome("ERROR", f"DicomError not one line naming the file: {str(err)[:80]!r}")
    except Exception as err:
        return Outcome("ERROR", f"{type(err).__name__}: {' '.join(str(err).split())[:80]}")
    if got is None:  # a reader without pixels (header) that accepted the file
        return Outcome("read")
    if expected is None:
        return Outcome("WRONG", "an image from a file pydicom does not read as one grayscale slice")
    if got.shape != expected.shape:
        return Outcome("WRONG", f"shape {got.shape}, expected {expected.shape}")
    diff = float(np.max(np.abs(got.astype(np.float64) - expected.astype(np.float64)))) if got.size else 0.0
    if diff == 0:
        return Outcome("exact")
    return Outcome("close", f"max diff {diff:g}") if diff <= tol else Outcome("WRONG", f"max diff {diff:g}")


def _triage(path: Path) -> np.ndarray | None:
    slices, images, skipped = load_study_files([path], CHANNEL_SIZE)
    if len(skipped):
        raise DicomError(path, str(skipped["reason"].iloc[0]))  # reasons are judged like the readers' errors
    if not len(slices):
        raise DicomError(path, "no file in it")  # an empty folder named .dcm: triage reads folders
    return images[0]


def _metadata(path: Path) -> None:
    _, row, reason = _header_row(path)
    if row is None:
        raise DicomError(path, reason)


def run_readers(path: Path, ref: Reference) -> dict[str, Outcome]:
    """Each reader's outcome on one file against the reference (HU for read_hu, windowed channels for the rest)."""
    channels = to_channels(ref.hu, CHANNEL_SIZE) if ref.hu is not None else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = {
            "header": _judge(path, lambda: (read_header(path), None)[1], None),
            "metadata": _judge(path, lambda: _metadata(path), None),
            "hu": _judge(path, lambda: read_hu(path), ref.hu),
            # Within 1 grey level where a resize mixes pixels (src.data.dicom_fast's documented contract).
            "fast": _judge(path, lambda: read_channels(path, CHANNEL_SIZE), channels, tol=1),
            "triage": _judge(path, lambda: _triage(path), channels, tol=1),
        }
    return out


def verdict(outcomes: dict[str, Outcome]) -> str:
    """read: the pixel readers give the reference; refused: every reader refuses in one line; other: anything else."""
    kinds = {name: o.kind for name, o in outcomes.items()}
    if any(k in ("WRONG", "ERROR") for k in kinds.values()):
        return "other"
    pixel = [kinds["hu"], kinds["fast"]]
    if all(k in ("exact", "close") for k in pixel):
        return "read"
    if all(k == "refused" for k in pixel) and kinds["triage"] == "refused":
        return "refused"
    return "other"  # one pixel reader reads what the other refuses


def _pixel_tag_offset(data: bytes) -> int | None:
    pos = data.rfind(b"\xe0\x7f\x10\x00")
    return pos if pos > 132 else None


def truncation_offsets(data: bytes, n: int) -> list[int]:
    """n cuts spread evenly over the file, plus cuts in and just after the last (7FE0,0010) element header."""
    size = len(data)
    cuts = {int(x) for x in np.linspace(0, size - 1, n + 2)[1:-1]}
    tag = _pixel_tag_offset(data)
    if tag is not None:
        cuts |= {tag + 2, tag + 6, tag + 10, tag + 12, tag + 16, tag + 24}
    return sorted(c for c in cuts if 0 <= c < size)


def crafted(tmp: Path) -> Iterator[tuple[str, Path]]:
    """Edited copies of real files and non-DICOM files named .dcm: (case name, file)."""
    ct = Path(pydicom.data.get_testdata_file("CT_small.dcm"))
    (tmp / "empty.dcm").write_bytes(b"")
    yield "empty .dcm", tmp / "empty.dcm"
    (tmp / "text.dcm").write_text("patient list\nnot an image\n")
    yield "text renamed .dcm", tmp / "text.dcm"
    (tmp / "random.dcm").write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    yield "random bytes .dcm", tmp / "random.dcm"
    (tmp / "dicm_only.dcm").write_bytes(b"\0" * 128 + b"DICM")
    yield "preamble only", tmp / "dicm_only.dcm"
    (tmp / "folder.dcm").mkdir(exist_ok=True)
    yield "folder named .dcm", tmp / "folder.dcm"
    with pydicom.config.disable_value_validation():
        base = pydicom.dcmread(ct)
        edits: dict[str, Callable[[pydicom.Dataset], None]] = {
            "CT_small as MONOCHROME1": lambda d: setattr(d, "PhotometricInterpretation", "MONOCHROME1"),
            "CT_small padding -2000": lambda d: _pad(d, -2000, int(d.pixel_array.min())),
            "CT_small 12-bit fault": lambda d: _twelve_bit(d, 1.0),
            "CT_small 12-bit fault, slope 2": lambda d: _twelve_bit(d, 2.0),
            "CT_small as PALETTE COLOR": lambda d: setattr(d, "PhotometricInterpretation", "PALETTE COLOR"),
            "CT_small as 2 frames": lambda d: setattr(d, "NumberOfFrames", 2),
            "CT_small no Rows": lambda d: delattr(d, "Rows"),
        }
        for k, (name, edit) in enumerate(edits.items()):
            ds = copy.deepcopy(base)
            edit(ds)
            out = tmp / f"edit{k}.dcm"
            ds.save_as(out)
            yield name, out


def _pad(ds: pydicom.Dataset, value: int, replace: int) -> None:
    px = ds.pixel_array.copy()
    px[px == replace] = value  # the darkest pixels become padding, as outside the field of view
    ds.PixelData = px.astype(np.int16).tobytes()
    ds.PixelPaddingValue = value


def _twelve_bit(ds: pydicom.Dataset, slope: float) -> None:
    hu = ds.pixel_array.astype(np.int64) + int(ds.RescaleIntercept)
    ds.PixelData = np.mod(np.clip(hu, -1000, 3095), 4096).astype(np.uint16).tobytes()  # the RSNA fault
    ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 12, 11, 0
    ds.RescaleIntercept, ds.RescaleSlope = 0, slope
