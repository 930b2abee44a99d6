"""Where things live: the data directory (Kaggle stage-2 layout), caches under work/, folds, outputs."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

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


def cache_dir(data_dir: Path, image_size: int) -> Path:
    """One cache per (data directory, image size); the hash keeps two datasets named alike apart."""
    digest = hashlib.sha1(str(Path(data_dir).resolve()).encode()).hexdigest()[:8]
    return WORK / "cache" / f"{Path(data_dir).name}-{digest}-{image_size}px"


def metadata_csv(data_dir: Path, split: str) -> Path:
    """Metadata depends on the data only, not on the image size, so it sits beside the size caches."""
    digest = hashlib.sha1(str(Path(data_dir).resolve()).encode()).hexdigest()[:8]
    return WORK / "cache" / f"{Path(data_dir).name}-{digest}-meta" / f"metadata_{split}.csv"


def folds_csv(n_folds: int, seed: int, data_dir: Path) -> Path:
    digest = hashlib.sha1(str(Path(data_dir).resolve()).encode()).hexdigest()[:8]
    return FOLDS_DIR / f"{Path(data_dir).name}-{digest}_k{n_folds}_seed{seed}.csv"
