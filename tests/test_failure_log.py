"""tests/conftest.py writes each failure's traceback at once when VITHYBRID_TEST_FAILURES names a file:
a GPU run stopped at its time budget keeps the causes of what failed before the stop."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_failures_are_written_as_they_happen_with_their_output(tmp_path):
    (tmp_path / "test_sample.py").write_text(
        "def test_passes():\n    assert True\n\n"
        "def test_fails():\n    print('diagnostic line')\n    assert 1 == 2, 'one is not two'\n"
    )
    log = tmp_path / "failures.log"
    env = {**os.environ, "VITHYBRID_TEST_FAILURES": str(log), "PYTHONPATH": str(ROOT)}
    env.pop("PYTEST_XDIST_WORKER", None)  # this test may itself run in an xdist worker
    cmd = [sys.executable, "-m", "pytest", str(tmp_path / "test_sample.py"), "-q", "-p", "tests.conftest",
           "-p", "no:cacheprovider", "--rootdir", str(tmp_path)]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stdout + done.stderr
    text = log.read_text()
    assert text.count("=== ") == 1 and "test_sample.py::test_fails (call)" in text, text
    assert "one is not two" in text and "diagnostic line" in text, text
