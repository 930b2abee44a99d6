"""What a saved result needs to be reproduced: the code's git hash and the Python and package versions."""

from __future__ import annotations

import importlib.metadata
import platform
import subprocess
from typing import Any

from src.paths import ROOT

PACKAGES = ("torch", "torchvision", "timm", "albumentations", "pydicom", "numpy", "pandas", "lightgbm")


def provenance() -> dict[str, Any]:
    """Git hash (marked +dirty), Python and package versions: what a saved result needs to be reproduced."""
    try:
        git = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        commit = git.stdout.strip() or "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        commit += "+dirty" if dirty.stdout.strip() else ""
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    packages = {}
    for name in PACKAGES:
        try:
            packages[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            packages[name] = None
    return {"git": commit, "python": platform.python_version(), "packages": packages}
