"""add_layer_norm_train (kernels/add_layer_norm_train.py): h = x + residual, LayerNorm(h) in float32 written in
autocast's dtype, and the backward, against float64 with autocast's unfused torch ops in the same dtypes as the
peer (tests/tolerance.py's idiom)."""

from __future__ import annotations

import importlib

import pytest
import torch
from vithybrid_fast.kernels import add_layer_norm_train

from tests.tolerance import assert_close_to_reference, unit_variance_row
from vithybrid_fast.gpu_support import interpreter_enabled

alnt = importlib.import_module("vithybrid_fast.kernels.add_layer_norm_train")  # the package binds the function
F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
# (x, residual, out): autocast's bf16 / fp16 branch on the float32 stream; LayerNorm-before (no residual:
# the float32 stream in, autocast's dtype out); one dtype throughout (a half-precision model under autocast)
CASES = [(BF16, F32, BF16), (F16, F32, F16), (F32, None, BF16), (F32, F32, F32), (BF16, BF16, BF16)]
IDS = ["bf16+f32", "f16+f32", "f32-plain", "f32", "bf16+bf16"]
WIDTHS = [1, 5, 768, 1000]  # one element, odd, ViT-Base, a masked tail


def _inputs(rows, width, x_dtype, res_dtype, device, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, width, generator=g) * scale).to(x_dtype).to(device)
    r = None if res_dtype is None else torch.randn(rows, width, generator=g).to(res_dtype).to(device)
    w = (1 + 0.1 * torch.randn(width, generator=g)).to(device)
    b = (0.1 * torch.randn(width, generator=g)).to(device)
    return x, r, w, b


def _grads(fn, x, r, w, b, dy, dh):
    """Values and gradients of fn (ours or the reference) for upstream gradients dy (of y) and dh (of h)."""
    leaves = [t.detach().clone().requires_grad_() for t in (x, r, w, b) if t is not None]
    x_, r_ = leaves[0], (leaves[1] if r is not None else None)
    w_, b_ = leaves[-2], leaves[-1]
    h, y = fn(x_, r_, w_, b_)
    loss = (y.double() * dy.double()).sum()
    if dh is not None:
        loss = loss + (h.double() * dh.double()).sum()
    return (h.detach(), y.detach(), *torch.autograd.grad(loss, leaves))


@pytest.mark.parametrize(("x_dtype", "res_dtype", "out_dtype"), CASES, ids=IDS)
@pytest.mark.parametrize("width", WIDTHS)
def test_forward_and_backward_match_float64_as_closely_as_torch(x_dtype, res_dtype, out_dtype, width, device):
    rows = 7  # the interpreter's 3 backward programs take 3, 3 and 1 rows (a ragged last run)
    x, r, w, b = _inputs(rows, width, x_dtype, res_dtype, device)
    g = torch.Generator().manual_seed(1)
    dy = torch.randn(rows, width, generator=g).to(out_dtype).to(device)
    dh = None if r is None else torch.randn(rows, width, generator=g).to(device)

    ours = _grads(lambda *t: add_layer_norm_train(*t, 1e-6, out_dtype), x, r, w, b, dy, dh)
    peer = _grads(lambda *t: alnt.reference(*t, 1e-6, out_dtype), x, r, w, b, dy, dh)
    up = [None if t is None else t.double() for t in (x, r, w, b)]
    exact = _grads(lambda *t: alnt.reference(*t, 1e-6, torch.float64), *up, dy, dh)

    h, y = ours[:2]
    h_dtype = x_dtype if r is None else torch.promote_types(x_dtype, res_dtype)
    assert (h.dtype, y.dtype, y.shape) == (h_dtype, out_dtype, x.shape)
    if r is None:
        assert torch.equal(h, x)
    else:
        torch.testing.assert_close(h, peer[0], rtol=0, atol=torch.finfo(h_dtype).eps * (x.abs().max() + 1))
    names = ["y", "dx", "dresidual", "dweight", "dbias"] if r is not None else ["y", "dx", "dweight", "dbias"]
    for name, got, torch_got, want in zip(names, ours[1:], peer[1:], exact[1:], strict=True):
        assert got.dtype == torch_got.dtype, (name, got.dtype, torch_got.dtype)
        assert_close_to_reference(got, torch_got, want, got.dtype, what=name)


def test_the_model_shape_at_batch_two(device):
    # ViT-Base rows (2 × 577 of 768) as a 3-D view: bf16 branch, float32 stream
    x, r, w, b = _inputs(2 * 577, 768, BF16, F32, device, seed=2)
    x, r = x.view(2, 577, 768), r.view(2, 577, 768)
    dy = torch.randn(2, 577, 768, generator=torch.Generator().manual_seed(3)).to(BF16).to(device)
    ours = _grads(lambda *t: add_layer_norm_train(*t, 1e-12, BF16), x, r, w, b, dy, None)
    peer = _grads(lambda *t: alnt.reference(*t, 1e-12, BF16), x, r, w, b, dy, None)
    up = [t.double() for t in (x, r, w, b)]
    exact = _grads(lambda *t: alnt.reference(*t, 1e-12, torch.float64), *up, dy, None)
    for name, got, torch_got, want in zip(["y", "dx", "dr", "dw", "db"], ours[1:], peer[1:], exact[1:], strict=True):
        assert_close_to_reference(got, torch_got, want, got.dtype, what=name)


def test_strided_inputs_and_gradients(device):
    # each tensor in its own layout: x a transposed view, the residual every other row, dy and dh strided
    x, r, w, b = _inputs(12, 40, BF16, F32, device, seed=4)
    x = x.t().contiguous().t()  # column-major storage: rows are not unit-stride
    r = torch.cat([r, r]).view(2, 12, 40)[0]  # a view of half the storage
    g = torch.Generator().manual_seed(5)
    dy = torch.randn(40, 12, generator=g).to(BF16).to(device).t()
    dh = torch.randn(12, 80, generator=g).to(device)[:, ::2]
    ours = _grads(lambda *t: add_layer_norm_train(*t, 1e-6, BF16), x, r, w, b, dy, dh)
    contiguous = [t.contiguous() for t in (x, r, w, b)]
    same = _grads(lambda *t: add_layer_norm_train(*t, 1e-6, BF16), *contiguous, dy.contiguous(), dh.contiguous())
    for got, want in zip(ours, same, strict=True):
        assert torch.equal(got, want)


@pytest.mark.parametrize("eps", [1e-12, 1e-5])
def test_constant_and_eps_sized_rows(eps, device):
    # a constant row is exactly the bias, with zero weight gradient from it; rows at variance ≈ eps follow eps
    width = 768
    base = unit_variance_row(width, seed=6)
    x = torch.stack([torch.full((width,), 3.25, dtype=torch.float64), base * eps**0.5]).float().to(device)
    w, b = torch.ones(width, device=device), torch.full((width,), 0.5, device=device)
    dy = torch.randn(2, width, generator=torch.Generator().manual_seed(7)).float().to(device)
    ours = _grads(lambda *t: add_layer_norm_train(*t, eps, F32), x, None, w, b, dy, None)
    exact = _grads(lambda *t: alnt.reference(*t, eps, torch.float64), x.double(), None, w.double(), b.double(), dy,
                   None)  # fmt: skip
    assert torch.equal(ours[1][0], b)
    for got, want in zip(ours[1:], exact[1:], strict=True):
        err = (got.double() - want).abs().max().item()
        assert err <= 1e-4 * max(1.0, want.abs().max().item()), err


def test_without_a_gradient_it_launches_directly_with_the_same_values(device, monkeypatch):
    x, r, w, b = _inputs(5, 48, BF16, F32, device, seed=7)
    with torch.no_grad():
        direct = add_layer_norm_train(x, r, w, b, 1e-6, BF16)
    via_op = alnt._add_layer_norm_train_op(x, r, w, b, 1e-6, BF16)
    assert torch.equal(direct[0], via_op[0]) and torch.equal(direct[1], via_op[1])
    assert via_op[2].shape == via_op[3].shape == (5,)


def test_the_registered_ops_agree_with_their_fake_shapes(device):
    x, r, w, b = _inputs(3, 40, BF16, F32, device, seed=8)
    checks = ("test_schema", "test_faketensor")
    torch.library.opcheck(alnt._add_layer_norm_train_op, (x, r, w, b, 1e-5, BF16), test_utils=checks)
    torch.library.opcheck(alnt._layer_norm_train_op, (r, w, b, 1e-5, BF16), test_utils=checks)
    h, _, mean, rstd = alnt._add_layer_norm_train_op(x, r, w, b, 1e-5, BF16)
    dy = torch.ones(3, 40, dtype=BF16, device=device)
    torch.library.opcheck(alnt._backward_op, (dy, None, h, mean, rstd, w, BF16, F32), test_utils=checks)
    torch.library.opcheck(alnt._backward_op, (dy, h, h, mean, rstd, w, F32, None), test_utils=checks)


def test_compiled_forward_and_backward_equal_eager(device):
    # finetune --compile: the ops stay single nodes, forward and backward
    x, r, w, b = _inputs(6, 32, BF16, F32, device, seed=9)
    dy = torch.randn(6, 32, generator=torch.Generator().manual_seed(10)).to(BF16).to(device)

    def step(x, r, w, b):
        _, normed = add_layer_norm_train(r, None, w, b, 1e-6, BF16)  # LayerNorm-before of the stream
        h, y = add_layer_norm_train(x + normed, r, w, b, 1e-6, BF16)
        return h, y

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    eager = _grads(step, x, r, w, b, dy, None)
    got = _grads(compiled, x, r, w, b, dy, None)
    for a, c in zip(eager, got, strict=True):
        assert torch.equal(a, c)


@pytest.mark.parametrize(
    ("m", "sms", "interpreter", "expected"),
    [(64 * 577, 132, False, (528, 70)), (577, 132, False, (289, 2)), (64 * 577, 108, False, (430, 86)),
     (7, 132, True, (3, 3)), (1, 132, False, (1, 1)), (0, 132, False, (0, 0))],
)  # fmt: skip
def test_backward_programs(m, sms, interpreter, expected):
    # a few programs per SM (H100: 132, A100: 108), each a run of rows; every program has rows, all are covered
    programs, rows = alnt.backward_programs(m, sms, interpreter)
    assert (programs, rows) == expected
    assert (programs - 1) * rows < m <= programs * rows or m == 0


@pytest.mark.parametrize(
    ("change", "error", "message"),
    [
        (lambda x, r, w, b: (x, r[:, :-1], w, b), ValueError, "must match x"),
        (lambda x, r, w, b: (x, r, w[:-1], b), ValueError, "weight and bias must be (16,)"),
        (lambda x, r, w, b: (x.double(), r, w, b), TypeError, "float64"),
        (lambda x, r, w, b: (x[:, :0], r[:, :0], w[:0], b[:0]), ValueError, "rows of 1 to 8192"),
    ],
    ids=["residual-shape", "weight-shape", "float64", "empty-rows"],
)
def test_bad_inputs_are_clear_errors(change, error, message, device):
    x, r, w, b = change(*_inputs(2, 16, BF16, F32, device))
    with pytest.raises(error, match=message.replace("(", r"\(").replace(")", r"\)")):
        add_layer_norm_train(x, r, w, b, 1e-5, BF16)


@pytest.mark.skipif(not interpreter_enabled(), reason="the interpreter's plan: on a GPU the plan is the GPU's")
def test_the_backward_launch_takes_the_interpreters_plan(monkeypatch):
    # 7 rows → 3 programs of 3, 3 and 1 rows: the only CPU coverage of ROWS > 1 (dw/db accumulated over rows
    # in registers) and of a ragged last run. Kills launch_backward dropping interpreter_enabled() (then each
    # program has one row and neither path runs on a CPU).
    plans = []
    real = alnt.backward_programs

    def spy(*args, **kwargs):
        plans.append(real(*args, **kwargs))
        return plans[-1]

    monkeypatch.setattr(alnt, "backward_programs", spy)
    g = torch.Generator().manual_seed(0)
    x, r = (torch.randn(7, 40, generator=g).requires_grad_() for _ in range(2))
    w, b = torch.ones(40, requires_grad=True), torch.zeros(40, requires_grad=True)
    add_layer_norm_train(x, r, w, b, 1e-6, torch.float32)[1].sum().backward()
    assert plans == [(3, 3)]
