"""Synthetic RSNA stage-2 dataset: head-CT phantom series written as DICOM with CSVs, masks and true volumes."""

from __future__ import annotations

import argparse
import os
import shutil
from concurrent.futures import Future, ProcessPoolExecutor
from contextlib import nullcontext
from multiprocessing import get_context
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pydicom
import pydicom.config
from tqdm import tqdm

from src import paths
from src.constants import ID_COL, LABELS, SUBTYPES, VOLUME_COL
from src.cpus import machine_threads
from src.errors import InputError, run_cli
from src.synth.phantom import Anatomy, render, sample_anatomy
from src.synth.series import Series, dicom_dataset

DEFAULT_STUDIES = 175  # ~140 train studies × ~24 slices ≈ 3,400 train images
TEST_FRACTION = 0.2
POSITIVE_RATE = 0.38
MIN_BLOOD_PX = 3  # a subtype counts on a slice only with this many blood pixels; fewer are not painted
BASE_SPACING_MM = 0.45 * 512  # field of view of a real 512 px head CT at 0.45 mm


def _hex(rng: np.random.Generator, n: int, used: set[str]) -> str:
    while True:
        value = "".join(rng.choice(list("0123456789abcdef"), n))
        if value not in used:
            used.add(value)
            return value


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


def _streaks(rng: np.random.Generator, shape: tuple[int, int, int], centre: np.ndarray, weight: np.ndarray):
    """Beam-hardening streaks radiating between dense skull-base bone; `weight` [n] fades them with height."""
    _n, rows, cols = shape
    rr, cc = np.mgrid[0:rows, 0:cols].astype(np.float32)
    out = np.zeros(shape, dtype=np.float32)
    # Streaks fade with distance from the petrous bones (radius ~25% of the field).
    fade = np.exp(-0.5 * (((rr - centre[0]) ** 2 + (cc - centre[1]) ** 2) / (0.25 * rows) ** 2))
    for _ in range(rng.integers(2, 6)):
        angle = rng.uniform(0, np.pi)
        amp = rng.uniform(8, 30) * (-1.0 if rng.random() < 0.65 else 1.0)  # mostly dark (Hounsfield bar)
        width = rng.uniform(0.8, 2.0) * rows / 128
        dist = np.abs((cc - centre[1]) * np.sin(angle) - (rr - centre[0]) * np.cos(angle))
        out += amp * (np.exp(-0.5 * (dist / width) ** 2) * fade)[None]
    return out * weight[:, None, None]


def _render_series(rng: np.random.Generator, anat: Anatomy, size: int, shape_kind: str) -> dict:
    """Geometry (tilt, position, spacing) and the rendered, blurred, noisy HU slices of one study."""
    rows = cols = size
    if shape_kind == "wide":
        cols = round(size * 1.25)
    elif shape_kind == "large":
        rows = cols = round(size * 1.5)
    fov = BASE_SPACING_MM * rng.uniform(0.9, 1.1)
    ps = fov / max(rows, cols) if shape_kind == "large" else fov / size
    spacing = float(rng.choice([4.0, 4.5, 5.0, 5.0, 5.0, 6.0, 7.0]) if rng.random() < 0.7 else rng.uniform(4, 7))
    tilt = np.deg2rad(rng.uniform(8, 25)) if rng.random() < 0.4 else 0.0
    row_dir = np.array([1.0, 0.0, 0.0])
    col_dir = np.array([0.0, np.cos(tilt), -np.sin(tilt)])
    normal = np.cross(row_dir, col_dir)
    table = np.array([rng.uniform(-8, 8), rng.uniform(-15, 15), rng.uniform(-40, 180)])
    head_centre = table + np.array([rng.normal(0, 6), rng.normal(0, 8), 0.0])
    rot = _rotation(*np.deg2rad([rng.normal(0, 5), rng.normal(0, 7), rng.normal(0, 3)]))
    c_ax = anat.axes[2]
    t = np.arange(-rng.uniform(0.5, 0.62) * c_ax, c_ax + spacing * 0.5, spacing) + rng.uniform(0, spacing)
    t = np.round(t, 3)
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
    hu = _gauss_blur(hu, rng.uniform(0.45, 0.85) * ps_ratio(ps))
    z_local = (rot.T @ (table + np.outer(t, normal) - head_centre).T)[2]
    low = np.clip((-z_local - 0.12 * c_ax) / (0.3 * c_ax), 0, 1)
    centre_px = np.array([(rows - 1) / 2 + rng.normal(0, 3), (cols - 1) / 2 + rng.normal(0, 3)])
    centre_px += (head_centre - table)[[1, 0]] / ps + np.array([anat.axes[1] * 0.25 / ps, 0])
    hu += _streaks(rng, hu.shape, centre_px, low) * (base > -200)
    sigma = rng.uniform(3, 12)
    noise = _gauss_blur(rng.standard_normal(hu.shape).astype(np.float32), 0.7)
    noise *= sigma / max(float(noise.std()), 1e-6) * (1 + 0.4 * low)[:, None, None]
    hu = np.clip(np.rint(hu + noise), -1024, 3071).astype(np.int16)
    return dict(
        positions=origin,
        orientation=np.concatenate([row_dir, col_dir]),
        pixel_spacing=(ps, ps),
        slice_spacing=spacing,
        hu=hu,
        blood=kind,
    )


def ps_ratio(ps: float) -> float:
    """Blur in pixels for a kernel of fixed width in mm: finer pixels need more pixels of blur."""
    return float(np.clip(1.8 / ps, 0.5, 3.0))


def _plan(rng: np.random.Generator, n_studies: int) -> tuple[list[str], list[str], list[str]]:
    """Patient of each study (some patients have several), split by patient; first train study positive."""
    used: set[str] = set()
    patients: list[str] = []
    for i in range(n_studies):
        if i > 1 and rng.random() < 0.15:
            patients.append(patients[rng.integers(2, i)] if i > 2 else patients[-1])
        else:
            patients.append("ID_" + _hex(rng, 9, used))
    order = [p for p in dict.fromkeys(patients) if p not in patients[:2]]
    rng.shuffle(order)
    n_test = max(1, round(TEST_FRACTION * n_studies)) if n_studies > 2 else 0
    test: set[str] = set()
    for p in order:
        if sum(q in test for q in patients) >= n_test:
            break
        test.add(p)
    split = ["test" if p in test else "train" for p in patients]
    positive = [bool(rng.random() < POSITIVE_RATE) for _ in range(n_studies)]
    positive[0], positive[1 % n_studies] = True, n_studies == 1
    return patients, split, ["pos" if p else "neg" for p in positive]


def generate(out_dir: Path, n_studies: int = DEFAULT_STUDIES, seed: int = 0, size: int = 128,
             writers: int | None = None) -> dict:
    """Write the whole dataset into `out_dir` (built beside it, then renamed); returns summary counts.

    `writers`: processes writing DICOM files while the next studies render (None: one per CPU but this one's;
    0: none, all in this process). The files are the same whichever: one random stream draws everything here."""
    tmp = out_dir.parent / f".{out_dir.name}.partial"
    if tmp.exists():
        shutil.rmtree(tmp)
    for sub in ("stage_2_train", "stage_2_test", "masks"):
        (tmp / sub).mkdir(parents=True)
    if writers is None:
        writers = machine_threads() - 1
    # spawn, not fork: the caller may hold threads (torch's, tqdm's monitor) whose locks a forked child inherits.
    with ProcessPoolExecutor(writers, mp_context=get_context("spawn")) if writers > 0 else nullcontext() as pool:
        summary = _generate(tmp, n_studies, seed, size, pool)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return summary


def _generate(root: Path, n_studies: int, seed: int, size: int, pool: ProcessPoolExecutor | None) -> dict:
    rng = np.random.default_rng(seed)
    written: list[Future] = []

    def write(s: Series, bug_intercept: float) -> None:
        if pool is None:
            _write_series(root, s, bug_intercept)
        else:
            written.append(pool.submit(_write_series, root, s, bug_intercept))

    patients, split, status = _plan(rng, n_studies)
    used: set[str] = set()
    series_list: list[Series] = []
    # ~1% of series carry the 12-bit intercept bug: at least one in train, the rest anywhere (test too).
    first_bug = int(rng.choice([i for i in range(n_studies) if split[i] == "train"]))
    others = [i for i in range(n_studies) if i != first_bug]
    n_more = min(len(others), max(0, round(0.011 * n_studies) - 1))
    bug_studies = {first_bug, *rng.choice(others, n_more, replace=False).tolist()}
    # A few series not square / not the usual size (real: 8 series), and one with a duplicated slice position.
    odd = rng.choice(n_studies, min(n_studies, max(2, n_studies // 40)), replace=False).tolist()
    odd_shapes = {study: ("wide", "large")[j % 2] for j, study in enumerate(odd[:-1])}
    dup_study = odd[-1]
    for i in tqdm(range(n_studies), desc="synth studies", unit="study"):
        n_lesions = 0 if status[i] == "neg" else int(rng.choice([1, 1, 1, 2, 2, 3]))
        anat = sample_anatomy(rng, n_lesions)
        geo = _render_series(rng, anat, size, odd_shapes.get(i, "square"))
        n = len(geo["hu"])
        p16 = 0.5 if split[i] == "train" else 0.85
        storage = "bug12" if i in bug_studies else ("int16" if rng.random() < p16 else "uint12")
        ids = ["ID_" + _hex(rng, 9, used) for _ in range(n)]
        s = Series(
            patient=patients[i],
            study="ID_" + _hex(rng, 10, used),
            series="ID_" + _hex(rng, 10, used),
            split=split[i],
            image_ids=ids,
            storage=storage,
            window_two_valued=bool(rng.random() < 0.5),
            extra_tags=bool(rng.random() < 0.05),
            **geo,
        )
        if i == dup_study and n > 3:  # a second image at the same position, re-noised
            k = int(rng.integers(1, n - 1))
            dup = s.hu[k].astype(np.int32) + np.rint(rng.normal(0, 2, s.hu[k].shape)).astype(np.int32)
            s.hu = np.insert(s.hu, k + 1, dup.astype(np.int16), axis=0)
            s.blood = np.insert(s.blood, k + 1, s.blood[k], axis=0)
            s.positions = np.insert(s.positions, k + 1, s.positions[k], axis=0)
            s.image_ids.insert(k + 1, "ID_" + _hex(rng, 9, used))
        series_list.append(s)
        if storage != "bug12":  # its intercept is drawn after every study renders; no other series reads it
            write(s, 0.0)
    train_blocks, volumes, test_ids = [], [], []
    corrupt_candidates = [
        (s, k)
        for s in series_list
        if s.split == "train" and s.storage != "bug12"
        for k in range(len(s.image_ids))
        if not (s.blood[k] >= 0).any()
    ]
    corrupt = corrupt_candidates[int(rng.integers(len(corrupt_candidates)))] if corrupt_candidates else None
    for s in series_list:
        bug_intercept = float(rng.integers(0, 2))
        if s.storage == "bug12":
            write(s, bug_intercept)
    for done in tqdm(written, desc="synth write", unit="series", initial=len(series_list) - len(written),
                     total=len(series_list)):
        done.result()
    if corrupt is not None:  # rewritten once its series is on disk: the header reads, the pixels do not
        s, k = corrupt
        ds = _dataset(s, k, 0.0)
        ds.PixelData = ds.PixelData[: len(ds.PixelData) // 3 // 2 * 2]
        _save(ds, root / f"stage_2_{s.split}" / f"{s.image_ids[k]}.dcm")
    for s in series_list:
        for k, image_id in enumerate(s.image_ids):
            if s.split == "test":
                test_ids.append(image_id)
                continue
            present = [int((s.blood[k] == j).any()) for j in range(len(SUBTYPES))]
            train_blocks.append((image_id, [*present, int(any(present))]))
            vol = float((s.blood[k] >= 0).sum()) * s.pixel_spacing[0] * s.pixel_spacing[1] * s.slice_spacing
            volumes.append((image_id, s.study, vol))
    labels = np.array([b[1] for b in train_blocks])
    dups = rng.choice(len(train_blocks), min(4, len(train_blocks)), replace=False)
    blocks = train_blocks + [train_blocks[i] for i in dups]
    blocks = [blocks[i] for i in rng.permutation(len(blocks))]
    rows = [(f"{image_id}_{name}", value) for image_id, vals in blocks for name, value in zip(LABELS, vals)]
    pd.DataFrame(rows, columns=[ID_COL, "Label"]).to_csv(root / paths.TRAIN_CSV, index=False)
    sub = [(f"{image_id}_{name}", 0.5) for image_id in test_ids for name in LABELS]
    pd.DataFrame(sub, columns=[ID_COL, "Label"]).to_csv(root / paths.SAMPLE_SUBMISSION_CSV, index=False)
    pd.DataFrame(volumes, columns=[ID_COL, "StudyInstanceUID", VOLUME_COL]).to_csv(
        root / paths.TRUE_VOLUMES_CSV, index=False, float_format="%.3f"
    )
    train_series = [s for s in series_list if s.split == "train"]
    return {
        "train_images": len(train_blocks),
        "test_images": len(test_ids),
        "train_studies": len(train_series),
        "test_studies": len(series_list) - len(train_series),
        "study_positive_rate": float(np.mean([(s.blood >= 0).any() for s in train_series])) if train_series else 0.0,
        "slice_rates": dict(zip(LABELS, labels.mean(axis=0).round(4).tolist())) if len(labels) else {},
        "corrupt": corrupt[0].image_ids[corrupt[1]] if corrupt else None,
    }


def _dataset(s: Series, k: int, bug_intercept: float) -> pydicom.Dataset:
    # RSNA UIDs (`ID_<hex>`) are invalid for VR UI, as in the real files: skip validation while building.
    with pydicom.config.disable_value_validation():
        return dicom_dataset(s, k, bug_intercept)


def _save(ds: pydicom.Dataset, path: Path) -> None:
    with pydicom.config.disable_value_validation():
        ds.save_as(path, enforce_file_format=True)


def _write_series(root: Path, s: Series, bug_intercept: float) -> None:
    """One series' DICOM files and, for train slices with blood, its mask PNGs."""
    for k, image_id in enumerate(s.image_ids):
        _save(_dataset(s, k, bug_intercept), root / f"stage_2_{s.split}" / f"{image_id}.dcm")
        mask = (s.blood[k] >= 0).astype(np.uint8) * 255
        if s.split == "train" and mask.any():
            cv2.imwrite(str(root / "masks" / f"{image_id}.png"), mask)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m src.synth", description=__doc__)
    parser.add_argument("out_dir", type=Path, help="output folder (replaced if it already holds a synthetic set)")
    parser.add_argument("--studies", type=int, default=DEFAULT_STUDIES, help="number of studies (train + test)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=128, help="usual Rows/Columns of the images")
    args = parser.parse_args(argv)
    if args.studies < 2:
        raise InputError(f"--studies {args.studies}: need at least 2 (one positive, one negative train study)")
    if args.size < 32:
        raise InputError(f"--size {args.size}: need at least 32 px")
    out = args.out_dir.resolve()
    if out.exists() and any(out.iterdir()) and not (out / paths.TRAIN_CSV).exists():
        raise InputError(f"{out}: exists and is not a synthetic data set; refusing to replace it")
    summary = generate(out, args.studies, args.seed, args.size)
    print(f"wrote {out}: {summary}")
    return 0


if __name__ == "__main__":
    run_cli(main)
