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
