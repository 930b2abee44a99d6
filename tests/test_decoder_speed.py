"""bench/decoder_speed.py: one row per decoder width, the config's default first, with the widths it built."""

from __future__ import annotations

import importlib.util
import json

import pytest

from src.cnn.model import MIN_DECODER_CHANNELS
from src.config import Config
from src.paths import ROOT

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_rows_follow_the_widths_and_the_default_is_the_yardstick(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("decoder_speed", ROOT / "bench" / "decoder_speed.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    monkeypatch.setattr(bench, "WORK", tmp_path)
    assert bench.main(["--size", "32", "--batch", "2", "--reps", "1", "--no-smp", "--widths", "1.0", "0.125"]) == 0
    rows = json.loads((tmp_path / "bench" / "decoder_speed.json").read_text())["rows"]
    assert "(the default)" in rows[0]["model"] and f"decoder_width={Config().decoder_width:g}" in rows[0]["model"]
    assert rows[0]["ratio_vs_own"] == 1.0 and all(r["seconds"] > 0 for r in rows)
    by_width = {r["model"].split("decoder_width=")[1].split()[0]: r for r in rows if "decoder_width=" in r["model"]}
    assert rows[-1]["model"].startswith("encoder alone") and rows[-1]["params_decoder"] == 0
    assert by_width["1"]["decoder_channels"] == [256, 128, 64, 64]  # resnet10t's levels, bottleneck first
    assert by_width["0.125"]["decoder_channels"] == [32, MIN_DECODER_CHANNELS, MIN_DECODER_CHANNELS,
                                                     MIN_DECODER_CHANNELS]
    assert by_width["1"]["params_decoder"] > rows[0]["params_decoder"] > by_width["0.125"]["params_decoder"]
    assert (tmp_path / "bench" / "decoder_speed.md").read_text().count("| own decoder") == 3
