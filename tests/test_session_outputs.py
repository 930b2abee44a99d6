"""The test session's output folder ($ICH_OUT, ~1.4 GB) is removed when the session ends, unless the user chose it."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

CONFTEST = Path(__file__).resolve().parent / "conftest.py"
PROBE = """
import os
from pathlib import Path

def test_probe():
    out = Path(os.environ["ICH_OUT"])
    (out / "checkpoint.bin").write_bytes(b"x" * 1024)  # something to clean up, as the real tests leave
    Path(os.environ["PROBE_RECORD"]).write_text(str(out))
"""


def run_probe(tmp_path: Path, ich_out: str | None) -> Path:
    suite = tmp_path / "suite"
    suite.mkdir()
    shutil.copy(CONFTEST, suite / "conftest.py")
    (suite / "test_probe.py").write_text(PROBE)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    record = tmp_path / "record.txt"
    env = {k: v for k, v in os.environ.items() if k != "ICH_OUT"}
    env.update(TMPDIR=str(scratch), PROBE_RECORD=str(record))
    if ich_out is not None:
        env["ICH_OUT"] = ich_out
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(suite)], env=env,
                          cwd=suite, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    return Path(record.read_text())


@pytest.mark.parametrize("chosen", [False, True], ids=["own-folder", "user-folder"])
def test_session_output_folder_is_removed_unless_the_user_chose_it(tmp_path, chosen):
    user_out = tmp_path / "mine"
    user_out.mkdir()
    used = run_probe(tmp_path, str(user_out) if chosen else None)
    if chosen:
        assert used == user_out and (used / "checkpoint.bin").exists()
    else:
        assert used.parent == tmp_path / "scratch" and used.name.startswith("ich-test-out-")
        assert not used.exists(), f"the session left {used} behind"
