"""Synthetic RSNA stage-2 dataset: head-CT phantom series written as DICOM with CSVs, masks and true volumes."""

from __future__ import annotations

import argparse
import os
import shutil
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
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
from src.synth.phantom import Anatomy, sample_anatomy
from src.synth.scan import ScanDraw, draw_scan, render_scan
from src.synth.series import Series, dicom_dataset

DEFAULT_STUDIES = 175  # ~140 train studies × ~24 slices ≈ 3,400 train images
TEST_FRACTION = 0.2
POSITIVE_RATE = 0.38


def _hex(rng: np.random.Generator, n: int, used: set[str]) -> str:
    while True:
        value = "".join(rng.choice(list("0123456789abcdef"), n))
        if value not in used:
            used.add(value)
            return value


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
             workers: int | None = None) -> dict:
    """Write the whole dataset into `out_dir` (built beside it, then renamed); returns summary counts.

    `workers`: processes that render and write studies while this one draws the next studies' settings (None: one
    per CPU, none on one CPU; 0: all in this process). The files are the same whichever: one random stream, here,
    draws everything."""
    tmp = out_dir.parent / f".{out_dir.name}.partial"
    if tmp.exists():
        shutil.rmtree(tmp)
    for sub in ("stage_2_train", "stage_2_test", "masks"):
        (tmp / sub).mkdir(parents=True)
    if workers is None:
        cpus = machine_threads()
        workers = cpus if cpus > 1 else 0
    # spawn, not fork: the caller may hold threads (torch's, tqdm's monitor) whose locks a forked child inherits.
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) if workers > 0 else nullcontext() as pool:
        summary = _generate(tmp, n_studies, seed, size, pool, workers)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return summary


@dataclass
class StudyDraw:
    """One study as drawn: everything random about it, so that any process can render it to the same pixels."""

    series: dict  # Series fields known before rendering (ids, split, storage, ...)
    anatomy: Anatomy
    scan: ScanDraw
    duplicate: tuple[int, np.ndarray, str] | None  # (slice k, re-noising [rows, cols], image id) of a second image


def _make_series(root: Path, study: StudyDraw) -> Series:
    """Render one drawn study; write its files unless it is a 12-bit-bug series (its intercept is drawn after
    every study renders, and no other series reads it)."""
    s = Series(**study.series, **render_scan(study.anatomy, study.scan))
    if study.duplicate is not None:  # a second image at the same position, re-noised
        k, renoise, image_id = study.duplicate
        dup = s.hu[k].astype(np.int32) + np.rint(renoise).astype(np.int32)
        s.hu = np.insert(s.hu, k + 1, dup.astype(np.int16), axis=0)
        s.blood = np.insert(s.blood, k + 1, s.blood[k], axis=0)
        s.positions = np.insert(s.positions, k + 1, s.positions[k], axis=0)
        s.image_ids.insert(k + 1, image_id)
    if s.storage != "bug12":
        _write_series(root, s, 0.0)
    return s


def _generate(root: Path, n_studies: int, seed: int, size: int, pool: ProcessPoolExecutor | None,
              workers: int) -> dict:
    rng = np.random.default_rng(seed)
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
    pending: deque[Future] = deque()
    progress = tqdm(total=n_studies, desc="synth studies", unit="study")

    def finished(s: Series) -> None:
        series_list.append(s)
        progress.update()

    for i in range(n_studies):
        n_lesions = 0 if status[i] == "neg" else int(rng.choice([1, 1, 1, 2, 2, 3]))
        anat = sample_anatomy(rng, n_lesions)
        scan = draw_scan(rng, anat, size, odd_shapes.get(i, "square"))
        n = len(scan.offsets)
        p16 = 0.5 if split[i] == "train" else 0.85
        storage = "bug12" if i in bug_studies else ("int16" if rng.random() < p16 else "uint12")
        fields = dict(patient=patients[i], image_ids=["ID_" + _hex(rng, 9, used) for _ in range(n)])
        fields.update(study="ID_" + _hex(rng, 10, used), series="ID_" + _hex(rng, 10, used), split=split[i],
                      storage=storage, window_two_valued=bool(rng.random() < 0.5),
                      extra_tags=bool(rng.random() < 0.05))
        duplicate = None
        if i == dup_study and n > 3:
            k = int(rng.integers(1, n - 1))
            renoise = rng.normal(0, 2, (scan.rows, scan.cols))
            duplicate = (k, renoise, "ID_" + _hex(rng, 9, used))
        study = StudyDraw(fields, anat, scan, duplicate)
        if pool is None:
            finished(_make_series(root, study))
            continue
        pending.append(pool.submit(_make_series, root, study))
        while len(pending) > 2 * workers:  # a few studies in flight: each holds its noise, ~1.5 MB at 128 px
            finished(pending.popleft().result())
    while pending:
        finished(pending.popleft().result())
    progress.close()
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
            _write_series(root, s, bug_intercept)
    if corrupt is not None:  # rewritten once its series is on disk: the header reads, the pixels do not
        s, k = corrupt
        with pydicom.config.disable_value_validation():
            ds = dicom_dataset(s, k, 0.0)
            ds.PixelData = ds.PixelData[: len(ds.PixelData) // 3 // 2 * 2]
            ds.save_as(root / f"stage_2_{s.split}" / f"{s.image_ids[k]}.dcm", enforce_file_format=True)
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


def _write_series(root: Path, s: Series, bug_intercept: float) -> None:
    """One series' DICOM files and, for train slices with blood, its mask PNGs."""
    # RSNA UIDs (`ID_<hex>`) are invalid for VR UI, as in the real files: skip validation while writing.
    with pydicom.config.disable_value_validation():
        for k, image_id in enumerate(s.image_ids):
            dicom_dataset(s, k, bug_intercept).save_as(root / f"stage_2_{s.split}" / f"{image_id}.dcm",
                                                       enforce_file_format=True)
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
