"""How many threads should the LightGBM stacker use? Fit time at several thread counts and data sizes.

    python bench/stack_threads.py [--rows 3000,30000] [--threads 1,2,4,16] [--features 40]

One LGBMStacker fit (six labels, early stopping on a patient-grouped inner split, the stacker's own parameters) on
random slice-like features with a weak signal, per row count and thread count; OpenMP waits passively, as in
`python -m src.stack`. Writes work/bench/stack_threads.{json,md} and prints the machine it ran on.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import pandas as pd

from src.atomic import write_json, write_text
from src.constants import LABELS
from src.paths import WORK
from src.stack.lgbm import LGBMStacker
from src.stack.threads import machine_threads


def fake_oof(rows: int, features: int, seed: int = 0) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """CNN-like probabilities per label plus extra features, labels drawn from them; ~20 slices per patient."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(-2.0, 1.5, (rows, len(LABELS)))
    y = (rng.random((rows, len(LABELS))) < 1 / (1 + np.exp(-logits))).astype(np.float64)
    probs = 1 / (1 + np.exp(-(logits + rng.normal(0, 1.0, logits.shape))))
    extra = rng.normal(size=(rows, features - len(LABELS)))
    x = pd.DataFrame(np.hstack([probs, extra]), columns=[*LABELS, *(f"f{i}" for i in range(features - len(LABELS)))])
    return x, y, np.arange(rows) // 20


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="3000,30000")
    parser.add_argument("--threads", default=f"1,2,4,{machine_threads()}")
    parser.add_argument("--features", type=int, default=40)
    args = parser.parse_args(argv)
    thread_counts = sorted({int(t) for t in args.threads.split(",")})
    results = []
    for rows in (int(r) for r in args.rows.split(",")):
        x, y, groups = fake_oof(rows, args.features)
        for threads in thread_counts:
            t0 = time.perf_counter()
            LGBMStacker(n_jobs=threads).fit(x, y, groups)
            results.append({"rows": rows, "threads": threads, "fit_s": time.perf_counter() - t0})
            print(results[-1], flush=True)
    machine = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
               f"{machine_threads()} available to this process")
    lines = [f"LightGBM stacker fit time on {machine} (OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']})", "",
             "| rows | threads | fit s | vs 1 thread |", "|---|---|---|---|"]
    for r in results:
        one = next(o["fit_s"] for o in results if o["rows"] == r["rows"] and o["threads"] == min(thread_counts))
        lines.append(f"| {r['rows']:,} | {r['threads']} | {r['fit_s']:.2f} | {one / r['fit_s']:.2f}x |")
    table = "\n".join(lines) + "\n"
    print(table)
    write_json({"machine": machine, "results": results}, WORK / "bench" / "stack_threads.json")
    write_text(table, WORK / "bench" / "stack_threads.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
