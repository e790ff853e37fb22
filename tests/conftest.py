"""Test set-up: without a CUDA GPU, Triton kernels run under the interpreter.

TRITON_INTERPRET must be set before triton is first imported, so this runs before any test module.
"""

from __future__ import annotations

import os
import sys

import torch

if not torch.cuda.is_available():
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("triton was imported before tests/conftest.py could set TRITON_INTERPRET=1")
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


# Under pytest-xdist every worker would start as many intra-op threads as the machine has cores: with
# 2 workers on 2 cores that is 4 busy threads, and spinning OpenMP threads slow both workers down (the CPU
# suite, one run each on the 2-core CI machine: 15.8 min that way, 13.8 min with shares). Each worker takes
# its share of the cores instead; the processes a test starts choose their own threads.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    from vithybrid_fast.distributed import usable_cpus  # after TRITON_INTERPRET is set: it imports triton

    torch.set_num_threads(max(1, usable_cpus() // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))


@pytest.fixture
def device() -> str:
    return DEVICE


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (none on this machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True, scope="session")
def _float32_without_tf32():
    """On a GPU, float32 tests compare true float32: cuDNN convolutions default to TF32, which turns a 1-ulp
    difference upstream (a kernel vs torch) into ~1e-3 errors that are the convolutions', not the kernels'."""
    if not torch.cuda.is_available():
        yield
        return
    from vithybrid_fast.gpu_support import true_fp32

    with true_fp32():
        yield


# -- failures written as they happen ----------------------------------------------------------------
# A device call stops pytest at its time budget; xdist then often needs SIGKILL, and the end-of-run
# summary with the tracebacks is never printed (a GPU run lost two failures' causes that way). With
# VITHYBRID_TEST_FAILURES=FILE each failure's traceback and captured output are appended to FILE at once.
def pytest_runtest_logreport(report):
    path = os.environ.get("VITHYBRID_TEST_FAILURES")
    if not path or not report.failed or os.environ.get("PYTEST_XDIST_WORKER"):
        return  # under xdist the controller gets every worker's report: write there only, once
    sections = "".join(f"\n--- {name} ---\n{text}" for name, text in report.sections)
    with open(path, "a", encoding="utf-8") as log:
        log.write(f"=== {report.nodeid} ({report.when})\n{report.longreprtext}{sections}\n\n")
