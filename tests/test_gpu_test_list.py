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


def test_the_list_is_ordered_for_a_call_cut_off_at_its_budget():
    # Empty since the H200 run of 2026-11-27, where every test it listed passed natively (one after a fix to
    # the test itself, rerun there). A test that no GPU has run goes here: GPU-relevant ones first, once each.
    lines = LIST.read_text().splitlines()
    assert all(line.strip() == line and line for line in lines)  # a blank or padded line is no node id
    assert len(lines) == len(set(lines))  # a test listed twice runs twice on scarce device time
    processing = [i for i, line in enumerate(lines) if line.startswith("tests/test_processing.py")]
    assert processing == list(range(len(lines) - len(processing), len(lines)))  # CPU-side image code last
