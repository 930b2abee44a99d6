"""End to end: `bash run_fold.sh 0` on a tiny generated set, DICOM to a checked submission, outputs under ICH_OUT."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from src.synth.generator import generate

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--set", "image_size=64", "--set", "seg_epochs=1", "--set", "head_epochs=1", "--set", "joint_epochs=1",
        "--set", "limit_train_batches=2", "--set", "batch_size=16", "--set", "num_workers=0",
        # The stage sections travel with --set too: fewer stacker fits and bootstrap resamples keep it a smoke test.
        "--set", "stack.n_inner=3", "--set", "report.n_boot=50"]


def run_fold(args: list[str], data: Path, out: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "ICH_DATA": str(data), "ICH_OUT": str(out)}
    return subprocess.run(["bash", str(ROOT / "run_fold.sh"), *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=900)


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory) -> Path:
    data = tmp_path_factory.mktemp("smoke") / "data"
    generate(data, n_studies=24, seed=3, size=64)
    return data


def repo_outputs() -> set[Path]:
    return {p for d in ("oof", "submissions", "folds", "work") for p in (ROOT / d).rglob("*") if p.is_file()}


def test_run_fold_zero_end_to_end(tiny_set, tmp_path):
    before = repo_outputs()
    done = run_fold(["0", *TINY], tiny_set, tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    exp = subprocess.run([sys.executable, "-m", "src.config", *TINY, "--get", "exp_name"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout.strip()
    oof = tmp_path / "oof" / exp
    valid = pd.read_csv(oof / "fold0_valid.csv")
    folds = pd.read_csv(next((tmp_path / "folds").glob("*.csv")))
    held_out = set(folds.loc[folds["fold"] == 0, "ID"])
    assert set(valid["ID"]) <= held_out and len(valid) >= len(held_out) - 1  # the corrupt file may be in fold 0
    assert (oof / "report" / "report.md").exists() and (oof / "report" / "thresholds.json").exists()
    for kind in ("lgbm", "gru", "blend"):  # reported in the same process as the CNN, by its worker processes
        assert (tmp_path / "oof" / f"{exp}_stack_{kind}" / "report" / "triage_studies.csv").exists(), kind
    assert done.stdout.count("== reports and triage: ") == 1
    assert (oof / "bloodnet" / "study_volumes.csv").exists()
    submission = pd.read_csv(tmp_path / "submissions" / f"{exp}_fold0.csv")
    sample = pd.read_csv(tiny_set / "stage_2_sample_submission.csv")
    assert list(submission["ID"]) == list(sample["ID"]) and submission["Label"].between(0, 1).all()
    assert "== check the submission" in done.stdout
    times = pd.read_csv(tmp_path / "work" / "run_fold0_stage_seconds.tsv", sep="\t")
    assert {"metadata", "train fold 0", "check the submission", "total"} <= set(times["stage"])
    total = times.set_index("stage")["seconds"]["total"]
    assert times["seconds"].ge(0).all() and times.loc[times["stage"] != "total", "seconds"].sum() <= total
    assert "== wall clock per stage" in done.stdout
    assert repo_outputs() == before  # every output went under ICH_OUT, none into the repository


@pytest.mark.parametrize("args, message", [
    (["x"], "fold must be an integer"),
    (["0", "--bogus"], "unknown option '--bogus'"),
    (["0", "--set", "nope=1"], "unknown config key 'nope'"),
])
def test_run_fold_bad_arguments_give_one_line(tiny_set, tmp_path, args, message):
    done = run_fold(args, tiny_set, tmp_path)
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], done.stderr
    assert "Traceback" not in done.stderr


def test_env_script_takes_ich_python_as_it_is(tmp_path):
    """A GPU image's own CUDA torch fails the CPU pins, and the image may have no registry to build .venv from:
    ICH_PYTHON names the interpreter to use, unchecked; a wrong one is a one-line error."""
    own = tmp_path / "gpu-python"
    own.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    own.chmod(0o755)
    script = f'source "{ROOT}/scripts/env.sh" && echo "PY=$PY"'
    done = subprocess.run(["bash", "-c", script], env={**os.environ, "ICH_PYTHON": str(own)}, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == f"PY={own}", done.stderr
    missing = subprocess.run(["bash", "-c", script], env={**os.environ, "ICH_PYTHON": str(tmp_path / "none")},
                             capture_output=True, text=True, timeout=60)
    assert missing.returncode == 1
    assert missing.stderr.strip() == f"error: ICH_PYTHON={tmp_path / 'none'} is not an executable"


@pytest.mark.parametrize("side_by_side", [True, False])
def test_env_script_builds_a_venv_with_its_bytecode(tmp_path, side_by_side):
    """A first run builds .venv/ from requirements.txt: pip's resolved wheels installed by one pip per CPU (when
    that fails, here for want of its helper script, by one pip), every package then byte-compiled (pip is told not
    to; compileall does it on every core): with PYTHONDONTWRITEBYTECODE set, nothing would write the .pyc later."""
    # Small, from the registry, not among the project's requirements; tomli is not in the python3 running env.sh
    requirements = ["tomli==2.4.0", "six==1.17.0"]
    python3 = subprocess.run(["bash", "-c", "command -v python3"], capture_output=True, text=True).stdout.strip()
    has_it = subprocess.run([python3, "-c", "import importlib.metadata as m; print(m.version('tomli'))"],
                            capture_output=True, text=True).stdout.strip()
    if has_it == "2.4.0":
        pytest.skip("python3 already has tomli 2.4.0: env.sh would use it and build nothing")
    (tmp_path / "scripts").mkdir()
    for name in ("env.sh", "split_install.py") if side_by_side else ("env.sh",):
        (tmp_path / "scripts" / name).write_text((ROOT / "scripts" / name).read_text())
    (tmp_path / "requirements.txt").write_text("\n".join(requirements) + "\n")
    env = {k: v for k, v in os.environ.items() if k != "ICH_PYTHON"}
    done = subprocess.run(["bash", "-c", 'source scripts/env.sh && echo "PY=$PY"'], cwd=tmp_path,
                          env={**env, "PYTHONDONTWRITEBYTECODE": "1"}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == f"PY={tmp_path / '.venv' / 'bin' / 'python'}"
    if side_by_side and len(os.sched_getaffinity(0)) >= 2:
        assert "[setup] installing 2 wheels with 2 pip processes at once" in done.stdout, done.stdout
        assert "one pip process" not in done.stdout
    elif not side_by_side:
        assert "[setup] installing with one pip process" in done.stdout, done.stdout
    site = next((tmp_path / ".venv" / "lib").glob("python3*/site-packages"))
    assert sorted(p.name.split(".")[0] for p in (site / "tomli" / "__pycache__").glob("*.pyc")) == [
        "__init__", "_parser", "_re", "_types"]
    assert list((site / "__pycache__").glob("six.*.pyc"))
    installed = subprocess.run([str(tmp_path / ".venv" / "bin" / "pip"), "list", "--format=freeze"],
                               capture_output=True, text=True, check=True).stdout.split()
    assert set(requirements) <= set(installed)
    assert not list((tmp_path / ".venv").glob(".install-plan*"))  # the plan and its parts are removed
    assert (tmp_path / ".venv" / ".requirements.sha1").read_text().split() == [
        subprocess.run(["sha1sum", "requirements.txt"], cwd=tmp_path, capture_output=True, text=True,
                       check=True).stdout.split()[0]]


def test_install_plan_splits_wheels_by_size(tmp_path):
    """scripts/split_install.py: the largest wheels first, each to the lightest part; downloads (size unknown)
    spread by count; every package in exactly one part, pinned to its resolved version."""
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import split_install
    finally:
        sys.path.pop(0)
    sizes = {"big": 900, "mid": 500, "small": 300, "tiny": 100}
    local = []
    for name, size in sizes.items():
        (tmp_path / f"{name}.whl").write_bytes(b"x" * size)
        local.append((f"{name}==1.0", (tmp_path / f"{name}.whl").as_uri()))
    remote = [(f"r{i}==2.0", f"https://example.org/r{i}.whl") for i in range(4)]
    parts = split_install.split(local + remote, 2)
    assert sorted(spec for part in parts for spec in part) == sorted(spec for spec, _ in local + remote)
    loads = [sum(sizes.get(spec.split("==")[0], 0) for spec in part) for part in parts]
    assert sorted(loads) == [900, 900] and [len(p) for p in parts] == [4, 4]
    report = tmp_path / "report.json"
    report.write_text(json.dumps({"install": [{"metadata": {"name": spec.split("==")[0], "version": "1.0"},
                                               "download_info": {"url": url}} for spec, url in local]}))
    assert split_install.main([str(report), "3", str(tmp_path / "plan")]) == 0
    written = [(tmp_path / f"plan.{i}.txt").read_text().split() for i in range(3)]
    assert written[0] == ["big==1.0"] and sorted(written[1] + written[2]) == ["mid==1.0", "small==1.0", "tiny==1.0"]


def test_gpu_check_runs_the_chosen_steps_and_says_when_there_is_no_gpu(tmp_path):
    def gpu_check(**env):
        return subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), str(tmp_path)], cwd=ROOT,
                              env={**os.environ, "ICH_PYTHON": sys.executable, **env}, capture_output=True,
                              text=True, timeout=120)

    every = gpu_check(DRY_RUN="1")
    assert [line.split()[1] for line in every.stdout.splitlines()[:-1]] == [
        "run_fold", "bench_eager", "bench_compile", "stack_threads"]
    benches = gpu_check(DRY_RUN="1", STEPS="eager compile", EAGER_S="77").stdout
    assert "run_fold" not in benches and "stack_threads" not in benches
    assert "small_data" in benches and "bench_eager (77 s)" in benches
    bench_lines = [line for line in benches.splitlines() if line.startswith("[gpu_check] bench_")]
    assert len(bench_lines) == 2 and all("--data work/gpu_check_data" in line for line in bench_lines)
    assert all(line.endswith("--gpu-sizes 256,512") for line in bench_lines)
    narrowed = gpu_check(DRY_RUN="1", STEPS="eager compile", GPU_SIZES="256,384", COMPILE_SIZES="256").stdout
    eager, compiled = [line for line in narrowed.splitlines() if line.startswith("[gpu_check] bench_")]
    assert eager.endswith("--no-compile --gpu-backbones resnet50d,efficientnet_b2,convnext_tiny --gpu-sizes 256,384")
    assert compiled.endswith("--gpu-backbones resnet50d --gpu-sizes 256")
    if not __import__("torch").cuda.is_available():
        real = gpu_check()
        assert real.returncode == 1 and "sees no CUDA device: scripts/gpu_check.sh measures a GPU" in real.stderr
        assert "Traceback" not in real.stderr


FAKE_PYTHON = """#!/usr/bin/env bash
# Every pipeline stage (python -m src.<stage>) is logged and answers FAKE_EXIT_<stage> (0 by default); the config,
# inline scripts and the rest go to the real interpreter, so run_fold.sh's own control flow is what runs.
if [ "$1" = "-m" ] && [ "$2" != "src.config" ]; then
  echo "$2" >> "$FAKE_LOG"
  if [ "$2" = "src.cnn.train" ]; then
    mkdir -p "$ICH_OUT/oof/$FAKE_EXP" && : > "$ICH_OUT/oof/$FAKE_EXP/fold0_valid.csv"
  fi
  code="FAKE_EXIT_${2//./_}"
  exit "${!code:-0}"
fi
exec {real} "$@"
"""


def fake_run_fold(tmp_path: Path, exits: dict[str, int]) -> tuple[subprocess.CompletedProcess, list[str]]:
    """run_fold.sh 0 with every stage faked (seconds, not minutes): which stages ran, and how the run ended."""
    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTHON.replace("{real}", sys.executable))
    fake.chmod(0o755)
    exp = subprocess.run([sys.executable, "-m", "src.config", "--get", "exp_name"], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout.strip()
    log = tmp_path / "stages.log"
    exit_codes = {f"FAKE_EXIT_{module.replace('.', '_')}": str(code) for module, code in exits.items()}
    env = {**os.environ, "ICH_PYTHON": str(fake), "ICH_DATA": str(tmp_path / "data"), "ICH_OUT": str(tmp_path / "out"),
           "FAKE_LOG": str(log), "FAKE_EXP": exp, **exit_codes}
    done = subprocess.run(["bash", str(ROOT / "run_fold.sh"), "0"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    return done, log.read_text().split()


def test_run_fold_goes_on_when_stacking_cannot_run_and_times_every_stage(tmp_path):
    done, ran = fake_run_fold(tmp_path, {"src.stack": 2})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "[stack] skipped" in done.stdout
    assert ran[:4] == ["src.data.metadata", "src.data.cache", "src.data.folds", "src.cnn.train"]
    assert "src.stack" in ran and ran.count("src.evaluate.submit") == 2  # the submission and its check
    assert ran.count("src.evaluate.report") == 1  # every report in one process
    times = pd.read_csv(tmp_path / "out" / "work" / "run_fold0_stage_seconds.tsv", sep="\t")
    assert "sequence stackers on the available OOF (failed: exit status 2)" in set(times["stage"])
    assert len(times) == len(ran) + 3  # each stage, two setup lines and the total


@pytest.mark.parametrize("module, status", [("src.stack", 1), ("src.cnn.train", 3)])
def test_run_fold_stops_on_a_failed_stage_with_its_status(tmp_path, module, status):
    done, ran = fake_run_fold(tmp_path, {module: status})
    assert done.returncode == status
    assert ran[-1] == module  # nothing ran after the failed stage
    times = pd.read_csv(tmp_path / "out" / "work" / "run_fold0_stage_seconds.tsv", sep="\t")
    assert times["stage"].iloc[-2].endswith(f"(failed: exit status {status})") and times["stage"].iloc[-1] == "total"
    assert len(times) == len(ran) + 3 and "== wall clock per stage" in done.stdout
