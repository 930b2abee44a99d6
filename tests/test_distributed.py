"""The training entry point under torchrun: 2 CPU processes (gloo), outputs written once by rank 0 and complete.

DDP runs without find_unused_parameters: a parameter left out of a step's graph would stop the second step."""

import os
import subprocess
import sys

import numpy as np
import pandas as pd

from src.data.cache import load_cache
from src.data.folds import load_folds
from src.paths import OOF_DIR, ROOT


def test_torchrun_two_cpu_processes(tiny_data):
    exp = "t_ddp"
    env = {**os.environ, "ICH_DATA": str(tiny_data), "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "src.cnn.train", "--fold", "0", "--set", f"exp={exp}", "--set", "backbone=resnet10t",
        "--set", "image_size=64", "--set", "arch=bloodnet",
        "--set", "seg_epochs=1", "--set", "head_epochs=1", "--set", "joint_epochs=1",
        "--set", "limit_train_batches=4", "--set", "num_workers=0",
        "--set", "batch_size=8", "--set", "tta_flip=false",
        # Accumulation skips the all-reduce on the first batch of each pair (no_sync); EMA follows each rank's copy.
        "--set", "accumulate=2", "--set", "ema=true",
    ]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400, check=False)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-3000:]
    assert "world=2" in log
    assert log.count(f"wrote {OOF_DIR / exp}/fold0_*") == 1  # rank 0 alone writes

    out = OOF_DIR / exp
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no half-written temp files
    valid = pd.read_csv(out / "fold0_valid.csv")
    folds = load_folds(tiny_data)
    meta, _, _ = load_cache(tiny_data, 64, "train")
    expected = set(folds.loc[folds["fold"] == 0, "ID"]) & set(meta["ID"])
    # Each rank predicted half the rows; the gathered table holds every held-out image exactly once.
    assert len(valid) == len(expected) and set(valid["ID"]) == expected
    test_meta, _, _ = load_cache(tiny_data, 64, "test")
    test = pd.read_csv(out / "fold0_test.csv")
    assert list(test["ID"]) == list(test_meta["ID"])
    emb = np.load(out / "fold0_valid_emb.npy")
    ids = pd.read_csv(out / "fold0_valid_emb_ids.csv")
    assert emb.shape[0] == len(ids) == len(expected)
    epochs = pd.read_csv(out / "fold0_epochs.csv")
    assert list(epochs["epoch"]) == [1, 2, 3] and list(epochs["phase"]) == ["segment", "head", "joint"]
    assert "blood_volume_mm3" in valid.columns
