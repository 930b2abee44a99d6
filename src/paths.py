"""Where things live: the data directory (Kaggle stage-2 layout), caches under work/, folds, outputs."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from src.atomic import write_json
from src.errors import InputError

ROOT = Path(__file__).resolve().parent.parent
# Everything the pipeline writes lives under OUT_ROOT: the repository, unless $ICH_OUT points elsewhere
# (the tests do, so that a test run never touches a user's work/, oof/ or submissions/).
OUT_ROOT = Path(os.environ["ICH_OUT"]).resolve() if os.environ.get("ICH_OUT") else ROOT
WORK = OUT_ROOT / "work"
FOLDS_DIR = OUT_ROOT / "folds"
OOF_DIR = OUT_ROOT / "oof"
SUBMISSIONS_DIR = OUT_ROOT / "submissions"
DEFAULT_INPUT = ROOT / "input"
SYNTHETIC_INPUT = DEFAULT_INPUT / "synthetic"

TRAIN_CSV = "stage_2_train.csv"
SAMPLE_SUBMISSION_CSV = "stage_2_sample_submission.csv"
# Kaggle copies name the image folders either way.
IMAGE_DIR_NAMES = {"train": ("stage_2_train", "stage_2_train_images"), "test": ("stage_2_test", "stage_2_test_images")}
MASKS_DIR = "masks"
TRUE_VOLUMES_CSV = "true_volumes.csv"
DATA_STAMP = "data_identity.json"  # in each cache folder: which dataset it was built from


def resolve_data_dir(explicit: str | os.PathLike | None = None) -> Path:
    """`--data` flag, else $ICH_DATA, else input/ when it holds Kaggle files, else input/synthetic/."""
    if explicit:
        return Path(explicit).resolve()
    if os.environ.get("ICH_DATA"):
        return Path(os.environ["ICH_DATA"]).resolve()
    if (DEFAULT_INPUT / TRAIN_CSV).exists():
        return DEFAULT_INPUT
    return SYNTHETIC_INPUT


def image_dir(data_dir: Path, split: str) -> Path:
    """The split's image folder (either Kaggle name); raises InputError naming what was looked for."""
    for name in IMAGE_DIR_NAMES[split]:
        if (data_dir / name).is_dir():
            return data_dir / name
    raise InputError(f"{data_dir}: no {' or '.join(IMAGE_DIR_NAMES[split])}/ folder")


def data_identity(data_dir: Path) -> str:
    """sha1 of what makes a dataset itself, not of where it lies: the label CSV, the sample submission and the sorted
    names of the image and mask files. Two copies of one dataset (e.g. input/ and a notebook's input mount) share it."""
    data_dir = Path(data_dir).resolve()
    h = hashlib.sha1()
    for name in (TRAIN_CSV, SAMPLE_SUBMISSION_CSV):
        if (data_dir / name).exists():
            with open(data_dir / name, "rb") as fh:
                h.update(hashlib.file_digest(fh, "sha1").digest())
    for split, names in IMAGE_DIR_NAMES.items():
        folder = next((data_dir / n for n in names if (data_dir / n).is_dir()), None)
        listed = sorted(e.name for e in os.scandir(folder)) if folder else []
        h.update(f"{split}:{len(listed)}:".encode() + "\n".join(listed).encode())
    # The painted masks are part of the data: a copy without them (the real-data situation) must not reuse the
    # metadata or cache of one with them, nor the reverse.
    masks = sorted(e.name for e in os.scandir(data_dir / MASKS_DIR)) if (data_dir / MASKS_DIR).is_dir() else []
    h.update(f"masks:{len(masks)}:".encode() + "\n".join(masks).encode())
    return h.hexdigest()


def _data_home(data_dir: Path, suffix: str) -> Path:
    """WORK/cache/<name>-<path digest>-<suffix>; when that is new, an existing folder made from the same data under
    another path is reused instead (a moved data directory neither rebuilds nor breaks a resume). A new folder is
    created with its DATA_STAMP, so that it can be found again the same way."""
    data_dir = Path(data_dir).resolve()
    own = WORK / "cache" / f"{data_dir.name}-{hashlib.sha1(str(data_dir).encode()).hexdigest()[:8]}-{suffix}"
    if own.is_dir() and (own / DATA_STAMP).exists():
        return own
    if (own, str(data_dir)) in _ADOPTED:  # found once per process: the search lists the data and says so once
        return _ADOPTED[own, str(data_dir)]
    identity = data_identity(data_dir)
    if not own.is_dir():
        for other in sorted((WORK / "cache").glob(f"*-{suffix}")):
            try:
                stamp = json.loads((other / DATA_STAMP).read_text())
            except (OSError, json.JSONDecodeError):
                continue
            if stamp.get("identity") == identity:
                print(f"{data_dir}: same data as {stamp.get('data_dir')}; using {other}")
                _ADOPTED[own, str(data_dir)] = other
                return other
    write_json({"identity": identity, "data_dir": str(data_dir)}, own / DATA_STAMP)
    return own


_ADOPTED: dict[tuple[Path, str], Path] = {}


def cache_dir(data_dir: Path, image_size: int) -> Path:
    """One cache per (dataset, image size), found by content when the data directory moved (_data_home)."""
    return _data_home(data_dir, f"{image_size}px")


def metadata_csv(data_dir: Path, split: str) -> Path:
    """Metadata depends on the data only, not on the image size, so it sits beside the size caches."""
    return _data_home(data_dir, "meta") / f"metadata_{split}.csv"


def folds_csv(n_folds: int, seed: int, data_dir: Path) -> Path:
    digest = hashlib.sha1(str(Path(data_dir).resolve()).encode()).hexdigest()[:8]
    return FOLDS_DIR / f"{Path(data_dir).name}-{digest}_k{n_folds}_seed{seed}.csv"
