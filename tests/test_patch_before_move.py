"""No test patches a model with Triton kernels and moves it to its device afterwards.

Under the interpreter the CPU is the device, so `patch(model, "triton").to(device)` passes on the CPU. On a
GPU machine (interpreter off) `patch` rightly refuses Triton for the still-CPU model: two GPU runs found
such a test (H200, 2026-11-26 and 2026-11-27), each after it had passed here for sessions. Users patch a
model where it runs; so do the tests.
"""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def _names_triton(node: ast.AST) -> bool:
    return any(isinstance(n, ast.Constant) and n.value == "triton" for n in ast.walk(node))


def _patch_call(node: ast.AST) -> ast.Call | None:
    """The `patch(...)` call `node` is, looking through chained `.train()` / `.eval()`."""
    while isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in ("train", "eval"):
        node = node.func.value
    if not isinstance(node, ast.Call):
        return None
    func = node.func
    name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None
    return node if name == "patch" else None


def moved_after_patching(source: str) -> list[int]:
    """Line numbers of `<patch(…, triton kernels)>.to(…)` in `source`."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "to":
            patched = _patch_call(node.func.value)
            if patched is not None and any(_names_triton(arg) for arg in patched.args[1:] + patched.keywords):
                lines.append(node.lineno)
    return lines


def test_the_check_finds_the_pattern_it_is_for():
    # the form the 2026-11-27 run found, and forms that are fine
    bad = 'model = vf.patch(Model(config), {"attention": "triton"}).to(device).train()\n'
    chained = 'model = vf.patch(Model(config), "triton").train().to(device)\n'
    good = 'model = vf.patch(Model(config).to(device), {"attention": "triton"}).train()\n'
    sdpa = 'model = vf.patch(Model(config), "sdpa").to(device)\n'
    assert moved_after_patching(bad) == [1] and moved_after_patching(chained) == [1]
    assert moved_after_patching(good) == [] and moved_after_patching(sdpa) == []


def test_no_test_moves_a_triton_patched_model():
    found = {
        f"{path.name}:{line}"
        for path in sorted(TESTS.rglob("*.py"))
        if path.name != Path(__file__).name
        for line in moved_after_patching(path.read_text())
    }
    assert not found, f"move the model to its device first, then patch it: {sorted(found)}"
