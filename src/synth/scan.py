"""One study's CT acquisition: scan geometry, rendering, blur, streaks and noise.

The random settings are drawn first (`draw_scan`, in the generator's one random stream, in the order they were always
drawn) and the slow, deterministic rendering comes after (`render_scan`), so a worker process can render a study
while the next one's settings are drawn: the same images whichever process renders them."""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from src.constants import SUBTYPES
from src.synth.phantom import Anatomy, render

MIN_BLOOD_PX = 3  # a subtype counts on a slice only with this many blood pixels; fewer are not painted
BASE_SPACING_MM = 0.45 * 512  # field of view of a real 512 px head CT at 0.45 mm


@dataclass
class ScanDraw:
    """Every random setting of one study's scan."""

    rows: int
    cols: int
    pixel_mm: float
    slice_spacing: float
    tilt: float  # gantry tilt (radians)
    table: np.ndarray  # [3] table position (mm)
    head_centre: np.ndarray  # [3]
    rotation: np.ndarray  # [3, 3] head pose
    offsets: np.ndarray  # [n] slice positions along the slice normal (mm)
    blur: float  # kernel width, scaled by ps_ratio
    centre_jitter: tuple[float, float]  # of the streaks' centre (px)
    streaks: list[tuple[float, float, float]]  # (angle, amplitude HU, width px)
    noise_sigma: float  # HU
    noise: np.ndarray  # float32 [n, rows, cols], standard normal before blur and scaling


def _rotation(yaw: float, pitch: float, roll: float) -> np.ndarray:
    cz, sz, cx, sx, cy, sy = np.cos(yaw), np.sin(yaw), np.cos(pitch), np.sin(pitch), np.cos(roll), np.sin(roll)
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    return rz @ rx @ ry


def _gauss_blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur of each slice (edges reflected, as numpy's "reflect": OpenCV's BORDER_REFLECT_101)."""
    radius = max(1, int(np.ceil(3 * sigma)))
    size = (2 * radius + 1, 2 * radius + 1)
    flat = np.ascontiguousarray(img, dtype=np.float32).reshape(-1, *img.shape[-2:])
    out = np.stack([cv2.GaussianBlur(s, size, sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_REFLECT_101)
                    for s in flat])
    return out.reshape(img.shape)


def ps_ratio(ps: float) -> float:
    """Blur in pixels for a kernel of fixed width in mm: finer pixels need more pixels of blur."""
    return float(np.clip(1.8 / ps, 0.5, 3.0))


def draw_scan(rng: np.random.Generator, anat: Anatomy, size: int, shape_kind: str) -> ScanDraw:
    """The scan's random settings (tilt, position, spacing, pose, blur, streaks, noise), drawn from `rng`."""
    rows = cols = size
    if shape_kind == "wide":
        cols = round(size * 1.25)
    elif shape_kind == "large":
        rows = cols = round(size * 1.5)
    fov = BASE_SPACING_MM * rng.uniform(0.9, 1.1)
    ps = fov / max(rows, cols) if shape_kind == "large" else fov / size
    spacing = float(rng.choice([4.0, 4.5, 5.0, 5.0, 5.0, 6.0, 7.0]) if rng.random() < 0.7 else rng.uniform(4, 7))
    tilt = np.deg2rad(rng.uniform(8, 25)) if rng.random() < 0.4 else 0.0
    table = np.array([rng.uniform(-8, 8), rng.uniform(-15, 15), rng.uniform(-40, 180)])
    head_centre = table + np.array([rng.normal(0, 6), rng.normal(0, 8), 0.0])
    rotation = _rotation(*np.deg2rad([rng.normal(0, 5), rng.normal(0, 7), rng.normal(0, 3)]))
    c_ax = anat.axes[2]
    t = np.arange(-rng.uniform(0.5, 0.62) * c_ax, c_ax + spacing * 0.5, spacing) + rng.uniform(0, spacing)
    blur = rng.uniform(0.45, 0.85)
    centre_jitter = (rng.normal(0, 3), rng.normal(0, 3))
    streaks = []
    for _ in range(rng.integers(2, 6)):  # beam hardening between dense skull-base bone
        angle = rng.uniform(0, np.pi)
        amp = rng.uniform(8, 30) * (-1.0 if rng.random() < 0.65 else 1.0)  # mostly dark (Hounsfield bar)
        width = rng.uniform(0.8, 2.0) * rows / 128
        streaks.append((angle, amp, width))
    noise_sigma = rng.uniform(3, 12)
    noise = rng.standard_normal((len(t), rows, cols)).astype(np.float32)
    return ScanDraw(rows, cols, ps, spacing, tilt, table, head_centre, rotation, np.round(t, 3), blur, centre_jitter,
                    streaks, noise_sigma, noise)


def _streaks(draw: ScanDraw, shape: tuple[int, int, int], centre: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """Beam-hardening streaks radiating between dense skull-base bone; `weight` [n] fades them with height."""
    _n, rows, cols = shape
    rr, cc = np.mgrid[0:rows, 0:cols].astype(np.float32)
    out = np.zeros(shape, dtype=np.float32)
    # Streaks fade with distance from the petrous bones (radius ~25% of the field).
    fade = np.exp(-0.5 * (((rr - centre[0]) ** 2 + (cc - centre[1]) ** 2) / (0.25 * rows) ** 2))
    for angle, amp, width in draw.streaks:
        dist = np.abs((cc - centre[1]) * np.sin(angle) - (rr - centre[0]) * np.cos(angle))
        out += amp * (np.exp(-0.5 * (dist / width) ** 2) * fade)[None]
    return out * weight[:, None, None]


def render_scan(anat: Anatomy, draw: ScanDraw) -> dict:
    """Geometry and the rendered, blurred, noisy HU slices of one study (keyword arguments of `Series`)."""
    rows, cols, ps, t = draw.rows, draw.cols, draw.pixel_mm, draw.offsets
    row_dir = np.array([1.0, 0.0, 0.0])
    col_dir = np.array([0.0, np.cos(draw.tilt), -np.sin(draw.tilt)])
    normal = np.cross(row_dir, col_dir)
    table, head_centre, rot, c_ax = draw.table, draw.head_centre, draw.rotation, anat.axes[2]
    origin = table[None] + t[:, None] * normal[None]
    origin = origin - (cols - 1) / 2 * ps * row_dir - (rows - 1) / 2 * ps * col_dir
    rr, cc = np.mgrid[0:rows, 0:cols]
    plane = cc.ravel()[:, None] * ps * row_dir + rr.ravel()[:, None] * ps * col_dir  # [P, 3]
    pts = origin[:, None, :] + plane[None]  # [n, P, 3]
    q = rot.T @ (pts.reshape(-1, 3) - head_centre).T
    base, kind, blood_hu = render(anat, q.astype(np.float32))
    n = len(t)
    base, kind, blood_hu = (a.reshape(n, rows, cols) for a in (base, kind, blood_hu))
    # Honest labels: a subtype is painted on a slice only where it covers MIN_BLOOD_PX pixels.
    for s in range(len(SUBTYPES)):
        count = (kind == s).sum(axis=(1, 2))
        kind[(count < MIN_BLOOD_PX)[:, None, None] & (kind == s)] = -1
    hu = np.where(kind >= 0, blood_hu, base)
    hu = _gauss_blur(hu, draw.blur * ps_ratio(ps))
    z_local = (rot.T @ (table + np.outer(t, normal) - head_centre).T)[2]
    low = np.clip((-z_local - 0.12 * c_ax) / (0.3 * c_ax), 0, 1)
    centre_px = np.array([(rows - 1) / 2 + draw.centre_jitter[0], (cols - 1) / 2 + draw.centre_jitter[1]])
    centre_px += (head_centre - table)[[1, 0]] / ps + np.array([anat.axes[1] * 0.25 / ps, 0])
    hu += _streaks(draw, hu.shape, centre_px, low) * (base > -200)
    noise = _gauss_blur(draw.noise, 0.7)
    noise *= draw.noise_sigma / max(float(noise.std()), 1e-6) * (1 + 0.4 * low)[:, None, None]
    hu = np.clip(np.rint(hu + noise), -1024, 3071).astype(np.int16)
    return dict(
        positions=origin,
        orientation=np.concatenate([row_dir, col_dir]),
        pixel_spacing=(ps, ps),
        slice_spacing=draw.slice_spacing,
        hu=hu,
        blood=kind,
    )
