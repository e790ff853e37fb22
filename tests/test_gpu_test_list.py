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
    # what the last GPU session (H200, 2026-11-26) changed from its failures and could not rerun there
    assert lines[:3] == [
        "tests/test_weight_freshness.py::test_an_ema_update_while_frozen_is_followed_where_it_bumps_versions",
        "tests/test_max_pool_padding.py::test_a_patched_transformers_stem_pools_without_the_copy_and_unpatches",
        "tests/test_weight_freshness.py::"
        "test_an_update_the_counters_miss_leaves_a_frozen_model_stale_only_in_its_derived_weights",
    ]
    assert len(lines) == len(set(lines))  # a test listed twice runs twice on scarce device time
    processing = [i for i, line in enumerate(lines) if line.startswith("tests/test_processing.py")]
    assert processing == list(range(len(lines) - len(processing), len(lines)))  # CPU-side image code last
