"""bench/cache_store.py and bench/dicom_scale.py in --quick mode: they run end to end and write their tables."""

import importlib.util
import json
import sys

from src import paths
from src.paths import ROOT


def _bench(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def test_cache_store_quick(tmp_path):
    before = paths.WORK
    assert _bench("cache_store").main(["--quick", "--out", str(tmp_path)]) == 0
    assert before == paths.WORK  # its scratch folder was this process's work folder only while it ran
    result = json.loads((tmp_path / "cache_store.json").read_text())
    entry = result["sizes"]["32"]
    assert entry["zstd"]["rows"] == entry["memmap"]["rows"] > 0 and entry["ratio"] > 1
    runs = {(r["format"], r["workers"]) for r in result["loader"]}
    assert runs == {(f, w) for f in ("memmap", "zstd") for w in (0, 1)}
    assert all(r["images_s"] > 0 for r in result["loader"])
    text = (tmp_path / "cache_store.md").read_text()
    assert "QUICK MODE" in text and "load average" in text and "projected on 16 cores" in text
    assert not (tmp_path / "cache_store_work").exists()  # scratch caches are removed


def test_dicom_scale_quick(tmp_path):
    work = tmp_path / "files"
    assert _bench("dicom_scale").main(["--quick", "--workdir", str(work), "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "dicom_scale.json").read_text())
    stages = [r["stage"] for r in result["rows"]]
    assert stages == ["headers (metadata stage)", "metadata again (freshness check)", "cache 32 px, memmap",
                      "cache 32 px, zstd"]
    assert all(r["files"] == 60 and r["peak_gb"] > 0 and r["files_per_s"] > 0 for r in result["rows"])
    assert set(result["projection"]) == set(stages)
    assert "QUICK MODE" in (tmp_path / "dicom_scale.md").read_text()
    assert not work.exists()  # the generated files are deleted without --keep


def test_cache_store_reads_the_installed_dicoms_without_the_network(monkeypatch):
    """pydicom's get_testdata_files downloads what is not on disk (offline: ~20 s of retries per file, minutes in
    all); the bench's real-CT figures must come from the installed corpus alone."""
    import pydicom.data

    def no_network(*args, **kwargs):
        raise AssertionError("pydicom.data.get_testdata_files may download: the bench must not call it")

    monkeypatch.setattr(pydicom.data, "get_testdata_files", no_network)
    bench = _bench("cache_store")
    files = bench.installed_test_dicoms()
    assert files and all(f.is_file() and f.suffix == ".dcm" for f in files)
    assert bench.real_ct(32)["files"] > 0
