"""Fast cache path: HU windows straight from Explicit VR Little Endian PixelData bytes, via per-file lookup tables."""

from __future__ import annotations

import functools
import os
import struct
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.uid import ExplicitVRLittleEndian

from src.constants import AIR_HU, WINDOWS
from src.data.dicom import RescaleKey, _as_stored, _needs_12bit_fix, _stored_to_hu, per_file, read_hu
from src.data.windows import _windows_u8, resize, to_channels

_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"})
_SHORT_VRS = frozenset({b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FD", b"FL", b"IS", b"LO", b"LT", b"PN",
                        b"SH", b"SL", b"SS", b"ST", b"TM", b"UI", b"UL", b"US"})  # fmt: skip
_SHORT = struct.Struct("<HH2sH")  # explicit VR little endian: tag, VR, 2-byte length
_LONG = struct.Struct("<HH2s2xI")  # ... VRs with a 4-byte length after 2 reserved bytes
_US_TAGS = {0x00280010: "rows", 0x00280011: "cols", 0x00280100: "allocated", 0x00280101: "bits",
            0x00280103: "rep", 0x00280002: "samples"}  # fmt: skip
_TEXT_TAGS = {0x00280008: "frames", 0x00280004: "photometric", 0x00281053: "slope", 0x00281052: "intercept",
              0x00020010: "syntax", 0x00080060: "modality"}  # fmt: skip
_PADDING_TAGS = {0x00280120: "pad", 0x00280121: "pad_limit"}  # US or SS
_PIXEL_DATA = 0x7FE00010
_MODALITY_LUT_SEQUENCE = 0x00283000  # a lookup table instead of slope/intercept: pydicom applies it


def _scan_explicit_le(buf: bytes) -> dict[str, Any] | None:
    """The few top-level fields read_hu needs, and the PixelData offset/length, from a DICM file in Explicit VR Little
    Endian; None at anything else (undefined lengths, unknown VRs, other syntaxes), which pydicom then reads."""
    if buf[128:132] != b"DICM":
        return None
    fields: dict[str, Any] = {}
    pos, end = 132, len(buf)
    while pos + 8 <= end:
        group, elem, vr, length = _SHORT.unpack_from(buf, pos)
        if group != 2 and fields.get("syntax") != ExplicitVRLittleEndian:
            return None  # the file meta group (always explicit LE) ended: only the plain syntax goes on
        if vr in _LONG_VRS:
            if pos + 12 > end:
                return None
            length = _LONG.unpack_from(buf, pos)[3]
            pos += 12
        elif vr in _SHORT_VRS:
            pos += 8
        else:
            return None
        tag = group << 16 | elem
        if length == 0xFFFFFFFF or group == 0xFFFE or pos + length > end:
            return None
        if tag == _PIXEL_DATA:
            return {**fields, "pixel_offset": pos, "pixel_length": length}
        if tag == _MODALITY_LUT_SEQUENCE:
            return None
        name = _US_TAGS.get(tag) or _TEXT_TAGS.get(tag) or _PADDING_TAGS.get(tag)
        if name is not None:
            if name in fields:
                return None
            value = buf[pos : pos + length]
            if tag in _US_TAGS:
                if vr != b"US" or length != 2:
                    return None
                fields[name] = int.from_bytes(value, "little")
            elif tag in _PADDING_TAGS:
                if vr not in (b"US", b"SS") or length != 2:
                    return None
                fields[name] = int.from_bytes(value, "little", signed=vr == b"SS")
            else:
                fields[name] = value.decode("ascii").split("\\")[0].strip(" \x00")
        pos += length
    return None


def _native_image(path: Path) -> tuple[np.ndarray, RescaleKey] | None:
    """(uint16 code words [rows, cols], the slow path's rescale key) of a plain single-frame 16-bit grey image, parsed
    without pydicom (whose per-element Dataset machinery costs half of the fast path); None for anything else."""
    try:
        buf = path.read_bytes()
        f = _scan_explicit_le(buf)
        if f is None or any(k not in f for k in _US_TAGS.values()):
            return None
        both = bool(f.get("slope")) and bool(f.get("intercept"))  # pydicom rescales only when both are present
        slope = float(f["slope"]) if both else 1.0
        intercept = float(f["intercept"]) if both else 0.0
        frames = int(f["frames"]) if f.get("frames") else 1
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    rows, cols, bits = f["rows"], f["cols"], f["bits"]
    if (
        rows < 1
        or cols < 1
        or f["allocated"] != 16
        or not 1 <= bits <= 16
        or f["rep"] not in (0, 1)
        or f["samples"] != 1
        or frames not in (0, 1)
        or f.get("photometric") not in ("MONOCHROME1", "MONOCHROME2")
        or f["pixel_length"] != rows * cols * 2  # short, padded or multi-frame: the generic path explains or reads it
        or ("pad_limit" in f and "pad" not in f)
    ):
        return None
    signed = f["rep"] == 1
    fix = _needs_12bit_fix(intercept, bits, signed, f.get("modality", "").upper())
    low = high = None
    if "pad" in f:
        low = _as_stored(f["pad"], bits, signed)
        high = _as_stored(f.get("pad_limit", f["pad"]), bits, signed)
        low, high = min(low, high), max(low, high)
    codes = np.frombuffer(buf, dtype="<u2", count=rows * cols, offset=f["pixel_offset"]).reshape(rows, cols)
    return codes, (slope, intercept, bits, signed, fix, low, high)


@functools.lru_cache(maxsize=64)
def _hu_lut(*key: Any) -> np.ndarray:
    """float32 HU of each of the 65536 code words, exactly as read_hu computes it per pixel."""
    bits, signed = key[2], key[3]
    codes = np.arange(1 << 16, dtype=np.uint16)
    shift = 16 - bits
    # pydicom 3 ignores the bits above BitsStored: shift left then back (arithmetic for signed: sign extension).
    shifted = np.left_shift(codes, shift)
    stored = (shifted.view(np.int16) if signed else shifted) >> shift
    lut = _stored_to_hu(stored.astype(np.int32), *key)
    lut.flags.writeable = False
    return lut


@functools.lru_cache(maxsize=64)
def _channel_lut(*key: Any) -> np.ndarray:
    """uint8 [3, 65536]: the windowed channels of each code word (exact where no resize mixes pixels)."""
    lut = np.empty((len(WINDOWS), 1 << 16), dtype=np.uint8)
    _windows_u8(_hu_lut(*key), lut)
    lut.flags.writeable = False
    return lut


def _air_channels() -> np.ndarray:
    air = np.empty((len(WINDOWS), 1), dtype=np.uint8)
    _windows_u8(np.array([AIR_HU], dtype=np.float32), air)
    return air[:, 0]


@per_file
def read_channels(path: str | os.PathLike, size: int, out: np.ndarray | None = None) -> np.ndarray:
    """to_channels(read_hu(path), size) at about decode-only speed (written into `out` if given, e.g. a cache row):
    one file read, stored values straight from the raw PixelData bytes. Equal to it within 1 grey level, and bit for
    bit when slope is 1, the intercept an integer and the shrink factor an integer (RSNA at 256/128 px) or when nothing
    is resized. Compressed or unusual files take the generic path; raises DicomError like read_hu."""
    path = Path(path)
    native = _native_image(path)
    if native is None:
        return _into(to_channels(read_hu(path), size), out)
    codes, key = native
    rows, cols = codes.shape
    side = max(rows, cols)
    slope, intercept, bits, signed, fix, pad_low, _ = key
    if side != size and (rows != cols or fix or pad_low is not None or (signed and bits < 16)):
        # Rare (non-square, wrapped 12-bit values, padding values, signed narrow pixels): exact HU via the LUT.
        return _into(to_channels(np.take(_hu_lut(*key), codes, mode="clip"), size), out)
    if out is None:
        out = np.empty((len(WINDOWS), size, size), dtype=np.uint8)
    if side != size:
        # Resize, then window, as to_channels does: windowing first would differ at every edge that a pixel block
        # straddles (clipping does not commute with averaging). HU is affine in the stored value here, so resize the
        # stored values and rescale only the resized pixels.
        stored = codes.view(np.int16) if signed else codes
        if not signed and bits < 16:
            stored = codes & np.uint16((1 << bits) - 1)  # pydicom 3 zeroes the unused high bits
        hu = resize(stored.astype(np.float32), size)
        if slope != 1.0:  # x * 1 is x exactly: skipping it changes nothing
            np.multiply(hu, np.float32(slope), out=hu)
        np.add(hu, np.float32(intercept), out=hu)
        _windows_u8(hu, out)
        return out
    # No resize: windowing is per pixel, so code word -> 3 uint8 is one gather per channel.
    lut = _channel_lut(*key)
    if rows == cols:
        for i in range(len(WINDOWS)):
            np.take(lut[i], codes, out=out[i], mode="clip")  # clip: no bounds check; codes are all < 65536
        return out
    out[:] = _air_channels()[:, None, None]
    top, left = (side - rows) // 2, (side - cols) // 2
    out[:, top : top + rows, left : left + cols] = lut[:, codes]
    return out


def _into(channels: np.ndarray, out: np.ndarray | None) -> np.ndarray:
    if out is None:
        return channels
    out[...] = channels
    return out
