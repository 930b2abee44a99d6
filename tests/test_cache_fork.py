"""The cache's worker pool survives a parent whose OpenCV thread pool already ran (it used to deadlock for good)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = """
import os, sys, tempfile
from pathlib import Path
os.environ["ICH_OUT"] = sys.argv[1]
import cv2
import numpy as np
from src.data import cache
from src.synth.generator import generate

cv2.setNumThreads(2)
for _ in range(3):
    cv2.resize(np.random.rand(1024, 1024).astype(np.float32), (512, 512))  # OpenCV's own threads are now up
data = Path(sys.argv[1]) / "data"
generate(data, n_studies=6, seed=1, size=64)
cache.build_cache(data, 64, "train", workers=2, chunk_rows=16)
assert cv2.getNumThreads() == 2, "the caller's OpenCV threads are given back"
print("built")
"""


def test_pool_after_opencv_threads_does_not_hang(tmp_path):
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                          timeout=240, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0 and "built" in done.stdout, done.stderr[-2000:]
