"""Every kernel family once, on tiny float32 shapes, under whatever triton the interpreter imports.

Run by tests/test_triton36_interpreter.py in a child process with TRITON_INTERPRET=1 and
PYTHONPATH=.venv/triton36, so the GPU machines' Triton version (3.6.0) is exercised on the CPU too:
its interpreter rewrites kernel source differently from 3.9's. Prints one JSON object:
{"triton": version, "cases": {name: {"kernel_err": e, "torch_err": e} or {"error": text}}}, the
errors measured against a float64 run of the plain-torch reference (DESIGN.md's rule: the kernel's
float32 error against the torch float32 error).
"""

from __future__ import annotations

import json
import os
import sys
import traceback

assert os.environ.get("TRITON_INTERPRET") == "1", "set TRITON_INTERPRET=1 before running this probe"

import torch  # noqa: E402
import triton  # noqa: E402
from vithybrid_fast.kernels import attention, fused_linear  # noqa: E402

from vithybrid_fast import kernels  # noqa: E402


def _errors(kernel_fn, reference_fn, inputs: list[torch.Tensor]) -> dict:
    """Max |kernel - exact| and |torch fp32 - exact| over every output, exact = reference in float64."""
    exact = reference_fn(*[t.double() if torch.is_tensor(t) else t for t in inputs])
    got = kernel_fn(*inputs)
    ref32 = reference_fn(*inputs)
    exact, got, ref32 = (o if isinstance(o, tuple) else (o,) for o in (exact, got, ref32))
    kernel_err = max(float((g.double() - e).abs().max()) for g, e in zip(got, exact))
    torch_err = max(float((r.double() - e).abs().max()) for r, e in zip(ref32, exact))
    return {"kernel_err": kernel_err, "torch_err": torch_err}


def _grad_errors(kernel_fn, reference_fn, inputs: list[torch.Tensor]) -> dict:
    """The same for the gradients of sum(output * g) with respect to every float input."""

    def grads(fn, xs):
        xs = [x.detach().clone().requires_grad_(True) for x in xs]
        out = fn(*xs)
        g = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape)
        return torch.autograd.grad((out * g).sum(), xs)

    exact = grads(reference_fn, [x.double() for x in inputs])
    got = grads(kernel_fn, inputs)
    ref32 = grads(reference_fn, inputs)
    kernel_err = max(float((a.double() - e).abs().max()) for a, e in zip(got, exact))
    torch_err = max(float((a.double() - e).abs().max()) for a, e in zip(ref32, exact))
    return {"kernel_err": kernel_err, "torch_err": torch_err}


def _cases() -> dict:
    g = torch.Generator().manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g)

    q, k, v = rand(1, 2, 37, 32), rand(1, 2, 37, 32), rand(1, 2, 37, 32)
    x = rand(2, 8, 5, 5)
    gn_w, gn_b = rand(8), rand(8)
    w = rand(6, 4, 3, 3)
    rows, ln_w, ln_b = rand(9, 32), rand(32), rand(32)
    fc1_w, fc1_b, fc2_w, fc2_b = rand(64, 32) * 0.2, rand(64), rand(32, 64) * 0.2, rand(32)
    res = rand(9, 32)
    mean, rstd = fused_linear.reference_layer_norm_stats(rows, 1e-6)
    return {
        "attention": lambda: _errors(kernels.flash_attention, attention.reference, [q, k, v]),
        "attention_backward": lambda: _grad_errors(kernels.flash_attention, attention.reference, [q, k, v]),
        "group_norm_act": lambda: _errors(
            lambda t: kernels.group_norm_act(t, 4, gn_w, gn_b, 1e-5, "relu"),
            lambda t: kernels.group_norm_act.reference(t, 4, gn_w.to(t.dtype), gn_b.to(t.dtype), 1e-5, "relu"),
            [x],
        ),
        "group_norm_act_backward": lambda: _grad_errors(
            lambda t: kernels.group_norm_act(t, 4, None, None, 1e-5, None),
            lambda t: kernels.group_norm_act.reference(t, 4, None, None, 1e-5, None),
            [x],
        ),
        "weight_standardize": lambda: _errors(kernels.weight_standardize, kernels.weight_standardize.reference, [w]),
        "weight_standardize_backward": lambda: _grad_errors(
            kernels.weight_standardize, kernels.weight_standardize.reference, [w]
        ),
        "fused_linear": lambda: _errors(
            lambda a, m, r: fused_linear.fused_linear(a, fc1_w, fc1_b, ln=(m, r, ln_w, ln_b), activation="gelu"),
            lambda a, m, r: fused_linear.reference(
                a,
                fc1_w.to(a.dtype),
                fc1_b.to(a.dtype),
                ln=(m, r, ln_w.to(a.dtype), ln_b.to(a.dtype)),
                activation="gelu",
            ),
            [rows, mean, rstd],
        ),
        "layer_norm_mlp": lambda: _errors(
            lambda a: kernels.layer_norm_mlp(a, ln_w, ln_b, fc1_w, fc1_b, fc2_w, fc2_b, 1e-6),
            lambda a: kernels.layer_norm_mlp.reference(
                a, *(t.to(a.dtype) for t in (ln_w, ln_b, fc1_w, fc1_b, fc2_w, fc2_b)), 1e-6
            ),
            [rows],
        ),
        "add_layer_norm": lambda: _errors(
            lambda a, r: kernels.add_layer_norm(a, r, ln_w, ln_b, 1e-6),
            lambda a, r: kernels.add_layer_norm.reference(a, r, ln_w.to(a.dtype), ln_b.to(a.dtype), 1e-6),
            [rows, res],
        ),
        "add_layer_norm_train": lambda: _errors(
            lambda a, r: kernels.add_layer_norm_train(a, r, ln_w, ln_b, 1e-6),
            lambda a, r: kernels.add_layer_norm_train.reference(a, r, ln_w.to(a.dtype), ln_b.to(a.dtype), 1e-6),
            [rows, res],
        ),
        "add_layer_norm_train_backward": lambda: _grad_errors(
            lambda a, r, w, b: kernels.add_layer_norm_train(a, r, w, b, 1e-6)[1],
            lambda a, r, w, b: kernels.add_layer_norm_train.reference(a, r, w, b, 1e-6)[1],
            [rows, res, ln_w, ln_b],
        ),
    }


def main() -> None:
    results = {}
    only = set(sys.argv[1:])
    for name, case in _cases().items():
        if only and name not in only:
            continue
        try:
            results[name] = case()
        except Exception as exc:  # each case reports on its own; the test names the ones that failed
            results[name] = {"error": "".join(traceback.format_exception_only(exc)).strip()[-2000:]}
    print(json.dumps({"triton": triton.__version__, "cases": results}))


if __name__ == "__main__":
    main()
