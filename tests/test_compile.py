"""torch.compile composability: every kernel is a torch custom op, so `fullgraph=True` traces through it.

Per kernel: compiled (aot_eager: AOTAutograd traces forward and backward, no codegen) against eager,
values and gradients, with the op present as one node of the Dynamo graph and the output layout kept;
`torch.library.opcheck` (all default utils: test_schema, test_autograd_registration, test_faketensor,
test_aot_dispatch_dynamic) on each op, including the fake implementations' strides for channels-last
and strided inputs; and the whole patched tiny model compiled with fullgraph=True against eager.
Kernels run under TRITON_INTERPRET=1 on a CPU (tests/conftest.py), so shapes are tiny.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable

import pytest
import torch
from torch._dynamo import lookup_backend
from vithybrid_fast.kernels.attention import reference as attention_reference
from vithybrid_fast.kernels.fused_linear import fused_linear, layer_norm_stats, reference_layer_norm_stats
from vithybrid_fast.kernels.fused_linear import reference as linear_reference
from vithybrid_fast.kernels.group_norm_act import group_norm_act
from vithybrid_fast.kernels.group_norm_act import reference as gn_reference
from vithybrid_fast.kernels.layer_norm_mlp import layer_norm_mlp
from vithybrid_fast.kernels.layer_norm_mlp import reference as mlp_reference
from vithybrid_fast.kernels.weight_standardize import reference as ws_reference
from vithybrid_fast.kernels.weight_standardize import weight_standardize

import vithybrid_fast as vf
from tests.hf_reference import randomize_, tiny_config
from tests.tolerance import assert_close_to_reference

OPS = torch.ops.vithybrid


def _randn(*shape: int, device: str, seed: int, channels_last: bool = False) -> torch.Tensor:
    t = torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(device)
    return t.to(memory_format=torch.channels_last) if channels_last else t


def _leaves(*tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
    return [None if t is None else t.detach().clone().requires_grad_() for t in tensors]


def _compile_recording(fn: Callable) -> tuple[Callable, list[torch.fx.GraphModule]]:
    """torch.compile(fn, fullgraph=True) on aot_eager, keeping each Dynamo graph for inspection."""
    graphs: list[torch.fx.GraphModule] = []
    aot_eager = lookup_backend("aot_eager")

    def backend(gm: torch.fx.GraphModule, example_inputs):
        graphs.append(gm)
        return aot_eager(gm, example_inputs)

    return torch.compile(fn, fullgraph=True, backend=backend), graphs


def _op_counts(graphs: list[torch.fx.GraphModule]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for gm in graphs:
        for node in gm.graph.nodes:
            target = str(node.target)
            if node.op == "call_function" and target.startswith("vithybrid."):
                name = target.split(".")[1]
                counts[name] = counts.get(name, 0) + 1
    return counts


# name → (function of the inputs, input builder (device) → tuple, ops expected in the graph)
def _ws_case(channels_last: bool):
    def build(device):
        return (_randn(6, 4, 3, 3, device=device, seed=1, channels_last=channels_last) * 0.1 + 0.02,)

    return (lambda w: weight_standardize(w, 1e-8) * 1.5, build, {"weight_standardize": 1})


def _gn_case(channels_last: bool, affine: bool, act: str | None, with_residual: bool):
    def build(device):
        x = _randn(2, 8, 5, 3, device=device, seed=2, channels_last=channels_last) * 2 + 0.5
        weight = _randn(8, device=device, seed=3) if affine else None
        bias = _randn(8, device=device, seed=4) if affine else None
        residual = _randn(2, 8, 5, 3, device=device, seed=5) if with_residual else None
        return x, weight, bias, residual

    def fn(x, weight, bias, residual):
        return group_norm_act(x, 4, weight, bias, 1e-5, act, residual) * 1.5

    return fn, build, {"group_norm_act": 1}


def _linear_build(device):
    x = _randn(2, 5, 16, device=device, seed=6) + 0.3
    ln_w, ln_b = _randn(16, device=device, seed=7), _randn(16, device=device, seed=8)
    weight, bias = _randn(24, 16, device=device, seed=9) * 0.25, _randn(24, device=device, seed=10)
    return x, ln_w, ln_b, weight, bias, _randn(2, 5, 24, device=device, seed=11)


def _ln_linear(x, ln_w, ln_b, weight, bias, residual):
    mean, rstd = layer_norm_stats(x, 1e-5)
    return fused_linear(x, weight, bias, ln=(mean, rstd, ln_w, ln_b), activation="gelu", residual=residual)


def _plain_linear(x, ln_w, ln_b, weight, bias, residual):
    return fused_linear(x, weight) * 1.5  # no bias, LN, activation or residual: every optional is None


def _mlp_build(device):
    x = _randn(2, 5, 16, device=device, seed=12) + 0.3
    ln_w, ln_b = _randn(16, device=device, seed=13), _randn(16, device=device, seed=14)
    fc1_w, fc1_b = _randn(24, 16, device=device, seed=15) * 0.25, _randn(24, device=device, seed=16)
    fc2_w, fc2_b = _randn(16, 24, device=device, seed=17) * 0.2, _randn(16, device=device, seed=18)
    return x, ln_w, ln_b, fc1_w, fc1_b, fc2_w, fc2_b


CASES = {
    "weight_standardize": _ws_case(channels_last=False),
    "weight_standardize-channels_last": _ws_case(channels_last=True),
    "group_norm_act-relu-residual": _gn_case(channels_last=False, affine=True, act="relu", with_residual=True),
    "group_norm_act-channels_last-relu-residual": _gn_case(
        channels_last=True, affine=True, act="relu", with_residual=True
    ),
    "group_norm_act-no_affine-no_act": _gn_case(channels_last=False, affine=False, act=None, with_residual=False),
    "layer_norm_stats+fused_linear-gelu-residual": (
        _ln_linear,
        _linear_build,
        {"layer_norm_stats": 1, "fused_linear": 1},
    ),
    "fused_linear-plain": (_plain_linear, _linear_build, {"fused_linear": 1}),
    "layer_norm_mlp": (lambda *t: layer_norm_mlp(*t, 1e-6), _mlp_build, {"layer_norm_mlp": 1}),
}


def _gn_reference(act: str | None):
    return lambda x, weight, bias, residual: gn_reference(x, 4, weight, bias, 1e-5, act, residual) * 1.5


def _ln_linear_reference(x, ln_w, ln_b, weight, bias, residual):
    ln = (*reference_layer_norm_stats(x, 1e-5), ln_w, ln_b)
    return linear_reference(x, weight, bias, ln=ln, activation="gelu", residual=residual)


# The plain-torch twin of each case (kernels' `reference` functions): compiled and eager are both ours,
# so eager is also held to the float64 reference (tolerance idiom, float32 plain torch as the peer).
REFERENCES = {
    "weight_standardize": lambda w: ws_reference(w, 1e-8) * 1.5,
    "weight_standardize-channels_last": lambda w: ws_reference(w, 1e-8) * 1.5,
    "group_norm_act-relu-residual": _gn_reference("relu"),
    "group_norm_act-channels_last-relu-residual": _gn_reference("relu"),
    "group_norm_act-no_affine-no_act": _gn_reference(None),
    "layer_norm_stats+fused_linear-gelu-residual": _ln_linear_reference,
    "fused_linear-plain": lambda x, ln_w, ln_b, weight, bias, residual: linear_reference(x, weight) * 1.5,
    "layer_norm_mlp": lambda *t: mlp_reference(*t, 1e-6),
}


def _assert_eager_matches_reference(name, inputs, eager_out, eager_grads, probe) -> None:
    """Forward and gradients of the eager kernel call against `REFERENCES[name]` in float64."""
    reference = REFERENCES[name]
    peer_inputs = _leaves(*inputs)
    ref_inputs = _leaves(*(None if t is None else t.double() for t in inputs))
    peer_out, ref_out = reference(*peer_inputs), reference(*ref_inputs)
    assert_close_to_reference(eager_out, peer_out, ref_out, torch.float32, what=f"{name} forward")
    peer_grads = torch.autograd.grad(
        (peer_out * probe).sum(), [t for t in peer_inputs if t is not None], allow_unused=True
    )
    ref_grads = torch.autograd.grad(
        (ref_out * probe.double()).sum(), [t for t in ref_inputs if t is not None], allow_unused=True
    )
    for i, (got, peer, ref) in enumerate(zip(eager_grads, peer_grads, ref_grads)):
        assert (got is None) == (ref is None), f"{name}: gradient {i} presence differs from the reference"
        if got is not None:
            assert_close_to_reference(got, peer, ref, torch.float32, what=f"{name} gradient {i}")


@pytest.mark.parametrize("name", list(CASES))
def test_compiled_matches_eager_forward_and_backward(name, device):
    fn, build, expected_ops = CASES[name]
    inputs = build(device)
    eager_inputs, compiled_inputs = _leaves(*inputs), _leaves(*inputs)
    compiled_fn, graphs = _compile_recording(fn)

    expected = fn(*eager_inputs)
    out = compiled_fn(*compiled_inputs)
    assert _op_counts(graphs) == expected_ops, [str(n.target) for g in graphs for n in g.graph.nodes]
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert out.stride() == expected.stride(), "the fake implementation must give the real output layout"

    probe = _randn(*expected.shape, device=device, seed=99)
    leaves = [t for t in eager_inputs if t is not None], [t for t in compiled_inputs if t is not None]
    eager_grads = torch.autograd.grad((expected * probe).sum(), leaves[0], allow_unused=True)
    compiled_grads = torch.autograd.grad((out * probe).sum(), leaves[1], allow_unused=True)
    assert any(g is not None for g in eager_grads)
    for i, (got, want) in enumerate(zip(compiled_grads, eager_grads)):
        assert (got is None) == (want is None), f"input {i}: gradient presence differs"
        if want is not None:
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=lambda m, i=i: f"input {i}: {m}")
    _assert_eager_matches_reference(name, inputs, expected.detach(), eager_grads, probe)


def _opcheck_cases(device: str) -> dict[str, tuple]:
    def r(*shape, seed, channels_last=False, grad=True):
        return _randn(*shape, device=device, seed=seed, channels_last=channels_last).requires_grad_(grad)

    def stats(*rows, seed):  # plausible (mean, rstd) for the LN prologue / the saved statistics
        return r(*rows, seed=seed, grad=False), r(*rows, seed=seed + 1, grad=False).abs() + 0.5

    ws, gn, fl = OPS.weight_standardize.default, OPS.group_norm_act.default, OPS.fused_linear.default
    w = r(6, 4, 3, 3, seed=20)
    x, x_cl, gy = r(2, 8, 5, 3, seed=21), r(2, 8, 5, 3, seed=22, channels_last=True), r(2, 8, 5, 3, seed=23)
    gamma, beta, residual = r(8, seed=24), r(8, seed=25), r(2, 8, 5, 3, seed=26)
    y_relu = r(2, 8, 5, 3, seed=41, grad=False).relu()  # a forward output: its positives mask the ReLU
    x_cl_3d = r(2, 7, 8, seed=27).transpose(1, 2)  # (N, C, S) seen through (N, S, C) storage
    h, ln_w, ln_b = r(2, 5, 16, seed=28), r(16, seed=29), r(16, seed=30)
    fc1_w, fc1_b, fc2_w, fc2_b = r(24, 16, seed=31), r(24, seed=32), r(16, 24, seed=33), r(16, seed=34)
    return {
        "weight_standardize": (ws, (w, 1e-8)),
        "weight_standardize-channels_last": (ws, (r(6, 4, 3, 3, seed=35, channels_last=True), 1e-8)),
        "weight_standardize-strided": (ws, (r(6, 8, 3, 3, seed=36)[:, ::2], 1e-8)),
        "weight_standardize_backward": (
            OPS.weight_standardize_backward.default,
            (r(6, 4, 3, 3, seed=37, grad=False), w.detach(), *stats(6, seed=38)),
        ),
        "group_norm_act": (gn, (x, 4, gamma, beta, 1e-5, "relu", residual)),
        "group_norm_act-channels_last": (gn, (x_cl, 4, gamma, beta, 1e-5, "relu", residual)),
        "group_norm_act-3d_channels_last-no_affine": (gn, (x_cl_3d, 2, None, None, 1e-5, None, None)),
        "group_norm_act-strided": (gn, (r(2, 8, 5, 6, seed=40)[..., ::2], 4, gamma, beta, 1e-5, "relu", None)),
        "group_norm_act_backward": (
            OPS.group_norm_act_backward.default,
            (gy.detach(), y_relu, x.detach(), gamma.detach(), *stats(2, 4, seed=42), True, True),
        ),
        "group_norm_act_backward-channels_last-no_relu": (
            OPS.group_norm_act_backward.default,
            (gy.detach(), None, x_cl.detach(), None, *stats(2, 4, seed=44), False, True),
        ),
        "layer_norm_stats": (OPS.layer_norm_stats.default, (h, 1e-5)),
        "fused_linear": (fl, (h, fc1_w, fc1_b, *stats(2, 5, seed=46), ln_w, ln_b, r(2, 5, 24, seed=48), "gelu")),
        "fused_linear-optionals_none": (fl, (h, fc1_w, None, None, None, None, None, None, None)),
        "layer_norm_mlp": (OPS.layer_norm_mlp.default, (h, ln_w, ln_b, fc1_w, fc1_b, fc2_w, fc2_b, 1e-5, True)),
    }


OPCHECK_NAMES = list(_opcheck_cases("cpu"))


@pytest.mark.parametrize("name", OPCHECK_NAMES)
def test_opcheck(name, device):
    op, args = _opcheck_cases(device)[name]
    # All default utils: schema (no mutation/aliasing), autograd registration, fake vs real (shapes,
    # dtypes and strides), and AOTAutograd with dynamic shapes (forward and gradients).
    torch.library.opcheck(op, args)


def test_whole_patched_model_compiles_fullgraph(device):
    torch.manual_seed(0)
    config = vf.ViTHybridConfig.from_dict(tiny_config(hidden_size=64, num_attention_heads=2, intermediate_size=80))
    model = vf.ViTHybridForImageClassification(config).eval()
    randomize_(model)
    pixels = _randn(2, 3, 72, 72, device=device, seed=0)
    with torch.no_grad():
        reference = model.to(device)(pixels).logits  # the unpatched plain-PyTorch model
    model = vf.patch(model, "triton")
    compiled, graphs = _compile_recording(model)
    with torch.no_grad():
        expected = model(pixels).logits
        got = compiled(pixels).logits  # fullgraph=True: any graph break raises
    diff = (got - expected).abs().max().item()
    assert diff <= 1e-4, f"compiled logits differ from eager by {diff:.3e}"
    diff = (got - reference).abs().max().item()
    assert diff <= 1e-4, f"compiled logits differ from the unpatched reference model by {diff:.3e}"
    counts = _op_counts(graphs)
    layers = config.num_hidden_layers
    assert len(graphs) == 1
    assert counts.get("flash_attention_packed") == layers, counts  # the encoder's packed-QKV entry point
    assert counts.get("layer_norm_stats") == layers and counts.get("fused_linear") == 2 * layers, counts
    assert counts.get("layer_norm_mlp") == layers, counts
    # Under the compiler the standardized-weight cache is bypassed: one op per backbone conv.
    assert counts.get("weight_standardize", 0) > 0 and counts.get("group_norm_act", 0) > 0, counts


def test_reloading_kernel_modules_re_registers_the_ops():
    # torch.library.custom_op replaces an op of the same name (its library is destroyed first), so a
    # reload neither raises nor leaves the old implementation behind. Runs in a fresh interpreter so
    # the reload cannot disturb the modules the other tests imported.
    script = """
import importlib, torch
names = ["weight_standardize", "group_norm_act", "fused_linear", "layer_norm_mlp"]
mods = [importlib.import_module(f"vithybrid_fast.kernels.{name}") for name in names]
for _ in range(2):
    mods = [importlib.reload(m) for m in mods]
ws, gn, fl, mlp = mods
torch.set_default_device("cuda" if torch.cuda.is_available() else "cpu")
w = torch.randn(4, 3, 3, 3, requires_grad=True)
ws.weight_standardize(w).sum().backward()
x = torch.randn(2, 4, 3, 3, requires_grad=True)
gn.group_norm_act(x, 2, None, None).sum().backward()
h = torch.randn(3, 8, requires_grad=True)
fl.fused_linear(h, torch.randn(5, 8)).sum().backward()
mlp.layer_norm_mlp(h, torch.ones(8), torch.zeros(8), torch.randn(6, 8), None, torch.randn(8, 6), None, 1e-5)
assert w.grad is not None and x.grad is not None and h.grad is not None
"""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    # os.environ carries TRITON_INTERPRET=1 from tests/conftest.py where there is no GPU.
    result = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]


def test_inference_calls_skip_the_dispatcher_but_equal_the_registered_ops(device):
    """No-grad calls launch directly (kernels._runtime.needs_registered_op); results are the op's."""
    from vithybrid_fast.kernels._runtime import needs_registered_op

    from vithybrid_fast import kernels

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 37, 32, generator=g).to(device) for _ in range(3))
    x = torch.randn(2, 8, 5, 5, generator=g).to(device)
    w, b = torch.randn(8, generator=g).to(device), torch.randn(8, generator=g).to(device)
    conv_w = torch.randn(6, 8, 3, 3, generator=g).to(device)
    with torch.no_grad():
        assert not needs_registered_op(q, k, v)
        assert torch.equal(kernels.flash_attention(q, k, v), torch.ops.vithybrid.flash_attention(q, k, v, 32**-0.5)[0])
        assert torch.equal(
            kernels.group_norm_act(x, 4, w, b, 1e-5, "relu", None),
            torch.ops.vithybrid.group_norm_act(x, 4, w, b, 1e-5, "relu", None)[0],
        )
        assert torch.equal(kernels.weight_standardize(conv_w), torch.ops.vithybrid.weight_standardize(conv_w, 1e-8)[0])
        # and both equal the plain-torch references (tolerance idiom against float64)
        direct = kernels.flash_attention(q, k, v), kernels.group_norm_act(x, 4, w, b, 1e-5, "relu", None)
        for out, fn, args, what in (
            (direct[0], attention_reference, (q, k, v), "flash_attention"),
            (direct[1], lambda x_, w_, b_: gn_reference(x_, 4, w_, b_, 1e-5, "relu"), (x, w, b), "group_norm_act"),
            (kernels.weight_standardize(conv_w), lambda c: ws_reference(c, 1e-8), (conv_w,), "weight_standardize"),
        ):
            peer, exact = fn(*args), fn(*(t.double() for t in args))
            assert_close_to_reference(out, peer, exact, torch.float32, what=what)
    assert needs_registered_op(q.requires_grad_())
