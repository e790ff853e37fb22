"""bench/gpu-tests-not-run-natively.txt feeds a GPU call (`gpu_session.sh plan tests-list=…`): one stale
node id and pytest stops at collection, spending scarce device time on nothing. Each line must name a
test file and, where given, a test function that still exists in it."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LIST = ROOT / "bench" / "gpu-tests-not-run-natively.txt"


def test_every_listed_test_exists():
    stale = []
    for line in LIST.read_text().splitlines():
        path, _, rest = line.partition("::")
        file = ROOT / path
        if not file.is_file():
            stale.append(line)
            continue
        function = rest.split("[", 1)[0]
        if function and not re.search(rf"^def {re.escape(function)}\(", file.read_text(), re.MULTILINE):
            stale.append(line)
    assert not stale, f"{LIST.name} names tests that no longer exist (remove or rename them): {stale[:5]}"


def test_the_gpu_relevant_tests_come_first():  # a call cut off at its budget has run those
    lines = LIST.read_text().splitlines()
    # what the last GPU session (H200, 2026-11-27) fixed from its failures: the rest of the list passed there
    assert lines[0] == "tests/test_finetune.py::test_one_training_step_with_triton_kernels_matches_the_reference"
    assert len(lines) == len(set(lines))  # a test listed twice runs twice on scarce device time
    processing = [i for i, line in enumerate(lines) if line.startswith("tests/test_processing.py")]
    assert processing == list(range(len(lines) - len(processing), len(lines)))  # CPU-side image code last
