"""Shared fixtures. Every output of the pipeline goes to a temp folder ($ICH_OUT), never the repository."""

import atexit
import os
import shutil
import tempfile
from pathlib import Path

# Must be set before any src module is imported: src.paths reads it once.
if "ICH_OUT" not in os.environ:
    # The session's outputs reach ~1.4 GB (caches, checkpoints, reports): a folder left behind per run filled the
    # disk by tens of GB. Removed when this process exits; a folder the user chose with ICH_OUT is theirs to keep.
    _session_out, _owner_pid = tempfile.mkdtemp(prefix="ich-test-out-"), os.getpid()
    os.environ["ICH_OUT"] = _session_out
    atexit.register(lambda: os.getpid() == _owner_pid and shutil.rmtree(_session_out, ignore_errors=True))
os.environ.pop("ICH_DATA", None)

import pytest


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """A small embedded synthetic dataset (64 px), generated once per test session."""
    from src.synth.generator import generate

    out = tmp_path_factory.mktemp("tiny_synth")
    generate(out, n_studies=14, seed=3, size=64)
    return out


@pytest.fixture
def one_torch_thread():
    """One torch thread for the test: on a shared 2-core machine two threads per process run ~10x slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def kill_cache_after(monkeypatch):
    """kill(n): the cache stage's chunk worker stops the build (as a kill would) once n chunks are done; returns the
    list of chunks it did."""
    from src.data import cache

    real = cache._process_chunk

    def kill(n: int) -> list[int]:
        calls: list[int] = []

        def dies(task):
            if len(calls) == n:
                raise KeyboardInterrupt
            calls.append(task["chunk"])
            return real(task)

        monkeypatch.setattr(cache, "_process_chunk", dies)
        return calls

    return kill
