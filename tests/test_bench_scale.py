"""bench/scale.py's own pieces: a workspace with RSNA's shape, the growth exponent, the goal verdicts."""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import numpy as np
import pytest

from src.constants import LABELS

_spec = importlib.util.spec_from_file_location("bench_scale", Path(__file__).resolve().parent.parent / "bench/scale.py")
scale = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(scale)


def test_generated_metadata_has_the_rsna_shape():
    meta = scale.make_metadata(40_000, np.random.RandomState(0), "tr", labels=True)
    assert len(meta) == 40_000 and meta["ID"].is_unique
    sizes = meta.groupby("StudyInstanceUID").size()
    assert sizes.iloc[:-1].between(20, 49).all() and 30 < sizes.mean() < 40  # RSNA: 34.6 slices a study
    studies_per_patient = meta.groupby("PatientID")["StudyInstanceUID"].nunique().mean()
    assert 1.05 < studies_per_patient < 1.3  # RSNA: 21,744 / 18,938 = 1.15
    rates = meta[list(LABELS)].mean()
    assert 0.10 < rates["any"] < 0.19
    assert (meta["any"] == meta[list(LABELS[:5])].max(axis=1)).all()
    assert rates["epidural"] < rates["intraventricular"] < rates["subdural"]  # the real order of the mix
    first = meta.sort_values(["StudyInstanceUID", "slice_index"]).groupby("StudyInstanceUID")["position"].diff()
    assert (first.dropna() == 5.0).all()


def test_growth_exponent_and_goals_projected_from_the_largest_scale():
    rows = [{"n": n, "stage": s, "seconds": t, "peak_gb": 0.5 + n / 8000}
            for n, ts in ((1000, (10.0, 1.0, 1.0)), (4000, (40.0, 16.0, 1.0)))
            for s, t in zip(("stackers (LightGBM + GRU)", "report (incl. study bootstrap)", "submission"), ts)]
    exp = scale.exponents(rows)
    assert exp["stackers (LightGBM + GRU)"] == pytest.approx(1.0) and exp["report (incl. study bootstrap)"] == 2.0
    args = argparse.Namespace(seeds=5, max_rounds=2000, gru_epochs=60)
    lines = scale.verdicts(rows, 16_000, args, threads=2)
    assert any(line.startswith("stack: 2.7 min at N=16000 (projected") and "met" in line for line in lines)
    # memory: 0.5 GB fixed + 0.125 GB per 1,000 rows, extended from the two scales to 16,000 rows
    assert any(line.startswith("largest peak RSS at N=16000: 2.5 GB") and "met" in line for line in lines)
    report = next(line for line in lines if line.startswith("report:"))
    assert "4.3 min" in report and "met" in report  # 16 s x 4^2
    lines = scale.verdicts(rows, 64_000, args, threads=2)
    assert "missed" in next(line for line in lines if line.startswith("report:"))
    assert any("would take ~" in line for line in lines)


def test_table_header_says_whether_other_jobs_shared_the_cores():
    info = {"cores": 2, "cpu": "x86_64", "ram_gb": 24.0, "load_before": 0.5, "emb_dim": 8, "seeds": 1,
            "max_rounds": 10, "gru_epochs": 1, "n_boot": 10}
    rows = [{"n": 100, "stage": "folds", "seconds": 1.0, "peak_gb": 0.1, "load_avg_1min": 1.2}]
    assert "not shared" in scale.markdown(rows, info, [])
    rows[0]["load_avg_1min"] = 5.0
    busy = scale.markdown(rows, info, [])
    assert "shared with other jobs" in busy and "5.0 at most" in busy


def test_the_stackers_stage_passes_its_thread_choice_to_the_stack_cli(tmp_path):
    for threads in (0, 3):  # 0: the CLI's own rule (src/stack/threads.py)
        args = argparse.Namespace(seeds=1, max_rounds=200, gru_epochs=5, stack_threads=threads, emb_dim=8, seed=0,
                                  n_boot=10)
        (cmd,) = [c for name, c in scale.stages(tmp_path, 1000, args) if name.startswith("stackers")]
        assert cmd[cmd.index("--threads") + 1] == str(threads) and cmd[1:3] == ["-m", "src.stack"]
