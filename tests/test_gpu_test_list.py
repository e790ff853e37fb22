"""bench/gpu-tests-not-run-natively.txt feeds a GPU call (`gpu_session.sh plan tests-list=…`): one stale
node id and pytest stops at collection, spending scarce device time on nothing. Each line must name a
test file and, where given, a test function that still exists in it.

The list was emptied by the H100 run of 2026-11-27 and then took the packed-attention tests written after
it; an empty list makes the checks pass whatever they do, so each is also run on made-up lists it must
reject."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LIST = ROOT / "bench" / "gpu-tests-not-run-natively.txt"


def stale_lines(lines: list[str]) -> list[str]:
    """The node ids whose file, or test function (a `def test…` at the top level), does not exist."""
    stale = []
    for line in lines:
        path, _, rest = line.partition("::")
        file = ROOT / path
        if not file.is_file():
            stale.append(line)
            continue
        function = rest.split("[", 1)[0]
        is_test = function.startswith("test") and re.search(rf"^def {re.escape(function)}\(", file.read_text(), re.M)
        if function and not is_test:  # pytest collects test_* functions only
            stale.append(line)
    return stale


def order_problems(lines: list[str]) -> list[str]:
    """What would waste a call cut off at its budget: blank or padded lines, a test listed twice (it runs
    twice), CPU-side image tests (tests/test_processing.py) anywhere but last."""
    problems = [f"not a node id: {line!r}" for line in lines if not line or line.strip() != line]
    problems += [f"listed twice: {line}" for line in sorted({line for line in lines if lines.count(line) > 1})]
    processing = [i for i, line in enumerate(lines) if line.startswith("tests/test_processing.py")]
    if processing != list(range(len(lines) - len(processing), len(lines))):
        problems.append("tests/test_processing.py is not last")
    return problems


def test_every_listed_test_exists():
    stale = stale_lines(LIST.read_text().splitlines())
    assert not stale, f"{LIST.name} names tests that no longer exist (remove or rename them): {stale[:5]}"


def test_the_list_is_ordered_for_a_call_cut_off_at_its_budget():
    # A test that no GPU has run goes in the list: GPU-relevant ones first, once each.
    assert order_problems(LIST.read_text().splitlines()) == []


def test_the_checks_reject_what_they_are_for():
    here = "tests/test_gpu_test_list.py"
    good = [f"{here}::test_every_listed_test_exists", "tests/test_processing.py::test_x"]
    assert stale_lines(good[:1]) == [] and order_problems(good) == []
    gone = [f"{here}::test_that_was_renamed", "tests/test_deleted_file.py", f"{here}::stale_lines"]
    assert stale_lines([*good[:1], *gone]) == gone  # a helper is no test function either
    assert order_problems([good[1], good[0], " padded", good[0]]) == [
        "not a node id: ' padded'", f"listed twice: {good[0]}", "tests/test_processing.py is not last",
    ]  # fmt: skip
