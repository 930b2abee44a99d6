"""bench/train_throughput.py: its CPU mode says it measured the CPU, and its GPU-mode rows run (here on the CPU)."""

from __future__ import annotations

import importlib.util
import json
import time

import pytest
import torch

from src.cnn.runtime import Runtime
from src.config import load_config
from src.data.cache import load_cache
from src.paths import ROOT, WORK

pytestmark = pytest.mark.usefixtures("one_torch_thread")
SMALL = ["arch=classifier", "backbone=resnet10t", "image_size=64", "batch_size=4", "num_workers=0"]


def bench_module():
    spec = importlib.util.spec_from_file_location("train_throughput", ROOT / "bench" / "train_throughput.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cpu_mode_says_it_measured_the_cpu(tiny_data, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    sets = [arg for s in SMALL for arg in ("--set", s)]
    bench_module().main(["--data", str(tiny_data), "--batches", "3", *sets])
    result = json.loads((WORK / "bench" / "train_throughput.json").read_text())
    assert result["device"] == "cpu" and result["backbone"] == "resnet10t"
    assert result["loader_images_per_s"] > 0 and result["train_images_per_s"] > 0
    assert result["loader_to_train_ratio"] == result["loader_images_per_s"] / result["train_images_per_s"]
    # Both memory formats are timed; the headline rate is the one training runs in.
    deployed = "channels_last" if result["training_channels_last"] else "contiguous"
    assert result["train_images_per_s"] == result[f"train_images_per_s_{deployed}"]
    assert result["channels_last_speedup"] == pytest.approx(
        result["train_images_per_s_channels_last"] / result["train_images_per_s_contiguous"])
    assert (WORK / "bench" / "train_throughput.md").read_text().startswith("CPU mode (no CUDA device found")


def test_cpu_mode_runs_the_default_bloodnet_with_masks_auto(tiny_data, monkeypatch):
    """The default arch trains with `masks: auto`, which the loss refuses until it is resolved from the data: the
    bench must resolve it as training does (the first GPU run of the bench stopped there)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    small_bloodnet = ["arch=bloodnet", "masks=auto", *SMALL[1:]]
    sets = [arg for s in small_bloodnet for arg in ("--set", s)]
    bench_module().main(["--data", str(tiny_data), "--batches", "3", *sets])
    result = json.loads((WORK / "bench" / "train_throughput.json").read_text())
    assert result["arch"] == "bloodnet" and result["train_images_per_s"] > 0


def test_gpu_mode_rows_run_on_any_device(tiny_data):
    bench = bench_module()
    cfg = load_config(None, SMALL)
    meta, images, _ = load_cache(tiny_data, 64, "train")
    cpu = Runtime(rank=0, world=1, device=torch.device("cpu"), amp_dtype=None, channels_last=False)
    seen = []
    rows = bench.accelerator_rows(cfg, meta, images, cpu, ["resnet10t"], [48], [False], batches=2, batch=4,
                                  on_row=lambda done: seen.append(len(done)))
    (row,) = rows
    assert seen == [1]
    assert row["image_size"] == 48 and row["batch"] == 4
    assert row["model_images_per_s"] > 0 and row["loader_images_per_s"] > 0 and row["loader_workers"] == 0
    assert "| resnet10t | 48 |" in bench.gpu_table(rows)
    ds = bench.resized_dataset(meta, images, cfg, 48, n=5)
    assert ds[0]["image"].shape == (cfg.in_chans, 48, 48) and len(ds) == 5


def test_gpu_mode_saves_each_row_as_it_is_measured(tiny_data, monkeypatch):
    """On a GPU a row can take a minute (autotuning, compile): a time limit must not lose the rows already done.
    main's GPU branch runs here with CUDA's checks answered as if a device were present and the rows stubbed."""
    bench = bench_module()
    cpu = Runtime(rank=0, world=1, device=torch.device("cpu"), amp_dtype=None, channels_last=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=0: "Fake GPU")
    monkeypatch.setattr(bench.Runtime, "create", staticmethod(lambda *args, **kwargs: cpu))
    saved = []

    def two_rows(*args, on_row, **kwargs):
        rows = []
        for backbone in ("resnet10t", "resnet18"):
            rows.append({"backbone": backbone, "image_size": 48, "batch": 4, "compile": False,
                         "model_images_per_s": 10.0, "loader_images_per_s": 30.0, "loader_to_model_ratio": 3.0})
            on_row(rows)
            saved.append(json.loads((WORK / "bench" / "train_throughput.json").read_text()))
        return rows

    monkeypatch.setattr(bench, "accelerator_rows", two_rows)
    sets = [arg for s in SMALL for arg in ("--set", s)]
    assert bench.main(["--data", str(tiny_data), *sets]) == 0
    assert [len(s["rows"]) for s in saved] == [1, 2] and all(s["partial"] for s in saved)
    final = json.loads((WORK / "bench" / "train_throughput.json").read_text())
    assert final["device_name"] == "Fake GPU" and not final["partial"] and len(final["rows"]) == 2
    assert (WORK / "bench" / "train_throughput.md").read_text().startswith("GPU mode on Fake GPU")


class SlowItems(torch.utils.data.Dataset):
    """Each item sleeps ITEM_S: the loader's rate is then workers / ITEM_S whatever the machine's load."""

    ITEM_S = 0.02

    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int) -> dict:
        time.sleep(self.ITEM_S)
        return {"image": torch.zeros(1, 2, 2)}


def test_loader_rate_keeps_every_worker_busy_on_a_small_set():
    """8 items, batches of 4, 4 workers: an epoch of the set itself holds only 2 batches, so 2 workers would idle
    and the queue refill at each epoch (about half the rate; the first GPU table read a quarter). The bench times one
    long epoch of repeated indices after the start-up burst: 4 workers x 4 items / (4 x 20 ms) = 200 images/s."""
    cfg = load_config(None, ["num_workers=4"])
    rate, workers = bench_module().loader_rate(SlowItems(), cfg, batch=4, batches=10)
    steady = workers / SlowItems.ITEM_S
    assert workers == 4
    assert 0.75 * steady < rate < 1.3 * steady
