"""The GPU machines' Triton (3.6.0) runs every kernel family in its interpreter on the CPU, too.

The suite runs under the venv's Triton (3.9) interpreter. 3.6's interpreter re-executes each kernel's
source and turns every assigned value into a one-element tensor, which NumPy >= 2.4 refuses to turn
into range()'s int: until kernels/_tuning.py carried the interpreter-only constexprs onto that copy,
attention, fused_linear and weight_standardize all failed there. The child process imports triton
from .venv/triton36, which the Makefile installs (tests/test_gpu_targets.py compiles with it too).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from vithybrid_fast.kernels import _tuning

from tests.triton36 import TRITON36, require_triton36

ROOT = Path(__file__).resolve().parents[1]
PROBE = Path(__file__).with_name("triton36_interpreter_probe.py")
FAMILIES = {
    "attention",
    "attention_backward",
    "group_norm_act",
    "group_norm_act_backward",
    "weight_standardize",
    "weight_standardize_backward",
    "fused_linear",
    "layer_norm_mlp",
    "add_layer_norm",
    "add_layer_norm_train",
    "add_layer_norm_train_backward",
}
ATOL = 1e-6  # DESIGN.md: kernel error <= 2 x the torch float32 error + a small atol


@pytest.fixture(scope="module")
def triton36_run():
    require_triton36()
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(TRITON36), str(ROOT), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, str(PROBE)], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_probe_imported_triton_36(triton36_run):
    assert triton36_run["triton"] == "3.6.0"
    assert set(triton36_run["cases"]) == FAMILIES


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_kernel_matches_reference_under_triton_36_interpreter(triton36_run, family):
    case = triton36_run["cases"][family]
    assert "error" not in case, case.get("error")
    assert case["kernel_err"] <= 2 * case["torch_err"] + ATOL, case


def test_rewritten_kernel_keeps_interpreter_constexprs():
    """A kernel source copy made by the interpreter gets the constexpr annotations `jit` added."""

    def original(N, BLOCK):
        return N

    def copy_from_source(N, BLOCK):  # what 3.6's rewrite returns: the source's annotations only
        return N

    copy_from_source.__annotations__ = {"BLOCK": "tl.constexpr"}

    class FakeInterpreted:
        fn = original

        def rewrite(self):
            return copy_from_source

    kernel = FakeInterpreted()
    _tuning._keep_annotations_when_rewritten(kernel, {"BLOCK": "tl.constexpr", "N": "tl.constexpr"})
    assert kernel.rewrite() is copy_from_source
    assert copy_from_source.__annotations__ == {"BLOCK": "tl.constexpr", "N": "tl.constexpr"}


def test_kernels_without_rewrite_are_left_alone():
    class Compiled:  # a JITFunction (GPU) or an interpreter that runs the original function
        pass

    kernel = Compiled()
    _tuning._keep_annotations_when_rewritten(kernel, {"N": "tl.constexpr"})
    assert not hasattr(kernel, "rewrite")


def test_an_install_for_another_python_is_skipped_not_failed(tmp_path):
    """Under a Python the install was not built for, importing it failed every triton-3.6 test (session 13's
    Python 3.10 run); it is a skip with its reason now."""
    from tests.triton36 import why_triton36_unusable

    assert "not installed at" in why_triton36_unusable(tmp_path / "absent")
    this = f"cp{sys.version_info.major}{sys.version_info.minor}"
    for tag, expected in (("cp39", f"was built for cp39, not {this}"), (this, None)):
        root = tmp_path / tag
        (root / "triton").mkdir(parents=True)
        (root / "triton-3.6.0.dist-info").mkdir()
        (root / "triton-3.6.0.dist-info" / "WHEEL").write_text(
            f"Wheel-Version: 1.0\nTag: {tag}-{tag}-manylinux_2_28_x86_64\n"
        )
        reason = why_triton36_unusable(root)
        assert reason is None if expected is None else expected in reason, reason
