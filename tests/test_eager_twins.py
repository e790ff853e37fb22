"""Eager twins (kernels/_eager.py): in eager training each kernel runs through an autograd.Function with its
custom op's own autograd rule, and torch.compile still sees the custom op. The twin must give exactly the
custom op's values and gradients (same launches), skip the backward op's dispatch, and leave gradients of
unused outputs unmaterialized where its rule takes None."""

from __future__ import annotations

import importlib

import pytest
import torch
from vithybrid_fast.kernels import (
    add_layer_norm_train,
    flash_attention,
    flash_attention_packed,
    group_norm_act,
    layer_norm_mlp,
    weight_standardize,
)
from vithybrid_fast.kernels.fused_linear import fused_linear, layer_norm_stats

alnt = importlib.import_module("vithybrid_fast.kernels.add_layer_norm_train")
gna = importlib.import_module("vithybrid_fast.kernels.group_norm_act")
ws = importlib.import_module("vithybrid_fast.kernels.weight_standardize")
attn = importlib.import_module("vithybrid_fast.kernels.attention")


def _leaf(*shape, device, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype).to(device).requires_grad_()


def _cases(device):
    """(name, public call, the same computation through the custom op, its leaves, the op's backward op)."""
    x = _leaf(2, 8, 4, 4, device=device)
    w, b = _leaf(8, device=device, seed=1), _leaf(8, device=device, seed=2)
    cw = _leaf(6, 4, 3, 3, device=device, seed=3)
    q, k, v = (_leaf(1, 2, 20, 32, device=device, seed=s) for s in (4, 5, 6))
    qkv = _leaf(1, 20, 3, 2, 32, device=device, seed=7)
    hx, hr = _leaf(5, 32, device=device, seed=8), _leaf(5, 32, device=device, seed=9)
    lw, lb = _leaf(32, device=device, seed=10), _leaf(32, device=device, seed=11)
    fw, fb, fr = (
        _leaf(16, 32, device=device, seed=12),
        _leaf(16, device=device, seed=13),
        _leaf(5, 16, device=device, seed=14),
    )
    m1w, m1b = _leaf(48, 32, device=device, seed=15), _leaf(48, device=device, seed=16)
    m2w, m2b = _leaf(32, 48, device=device, seed=17), _leaf(32, device=device, seed=18)
    ops = torch.ops.vithybrid
    return [
        ("group_norm_act", lambda: group_norm_act(x, 4, w, b, 1e-5, "relu"),
         lambda: ops.group_norm_act(x, 4, w, b, 1e-5, "relu", None)[0], (x, w, b), gna._group_norm_act_backward_op),
        ("weight_standardize", lambda: weight_standardize(cw), lambda: ops.weight_standardize(cw, 1e-8)[0], (cw,),
         ws._weight_standardize_backward_op),
        ("flash_attention", lambda: flash_attention(q, k, v), lambda: ops.flash_attention(q, k, v, 32**-0.5)[0],
         (q, k, v), attn._flash_attention_backward_op),
        ("flash_attention_packed", lambda: flash_attention_packed(qkv),
         lambda: ops.flash_attention_packed(qkv, 32**-0.5)[0], (qkv,), attn._flash_attention_packed_backward_op),
        ("add_layer_norm_train", lambda: add_layer_norm_train(hx, hr, lw, lb, 1e-6, torch.float32)[1],
         lambda: ops.add_layer_norm_train(hx, hr, lw, lb, 1e-6, torch.float32)[1], (hx, hr, lw, lb),
         alnt._backward_op),
        ("layer_norm_train", lambda: add_layer_norm_train(hx, None, lw, lb, 1e-6, torch.float32)[1],
         lambda: ops.layer_norm_train(hx, lw, lb, 1e-6, torch.float32)[0], (hx, lw, lb), alnt._backward_op),
        # autograd by recomputation in torch (reference_grads): no backward op to skip
        ("layer_norm_stats", lambda: layer_norm_stats(hx, 1e-6)[1], lambda: ops.layer_norm_stats(hx, 1e-6)[1],
         (hx,), None),
        ("fused_linear", lambda: fused_linear(hx, fw, fb, activation="gelu", residual=fr),
         lambda: ops.fused_linear(hx, fw, fb, None, None, None, None, fr, "gelu"), (hx, fw, fb, fr), None),
        ("layer_norm_mlp", lambda: layer_norm_mlp(hx, lw, lb, m1w, m1b, m2w, m2b, 1e-6),
         lambda: ops.layer_norm_mlp(hx, lw, lb, m1w, m1b, m2w, m2b, 1e-6, True), (hx, lw, lb, m1w, m1b, m2w, m2b),
         None),
    ]  # fmt: skip


def _value_and_grads(fn, leaves):
    out = fn()
    upstream = torch.linspace(-1, 1, out.numel(), device=out.device).view(out.shape).to(out.dtype)
    return out.detach(), torch.autograd.grad(out, leaves, upstream), out.grad_fn


@pytest.mark.parametrize("name", [c[0] for c in _cases("cpu")])
def test_the_twin_gives_the_custom_ops_values_and_gradients_exactly(name, device):
    (case,) = [c for c in _cases(device) if c[0] == name]
    _, public, through_op, leaves, _ = case
    out, grads, grad_fn = _value_and_grads(public, leaves)
    want, want_grads, op_grad_fn = _value_and_grads(through_op, leaves)
    # the public call took the twin (an autograd.Function of its own), the op call the custom op
    assert "_eager" in type(grad_fn).__name__, type(grad_fn).__name__
    assert "_eager" not in type(op_grad_fn).__name__
    assert torch.equal(out, want)
    for got, exp in zip(grads, want_grads, strict=True):
        assert torch.equal(got, exp)


@pytest.mark.parametrize("name", [c[0] for c in _cases("cpu") if c[4] is not None])
def test_the_twins_backward_skips_the_backward_ops_dispatch(name, device, monkeypatch):
    (case,) = [c for c in _cases(device) if c[0] == name]
    _, public, through_op, leaves, backward_op = case
    calls = []
    real_call = type(backward_op).__call__
    monkeypatch.setattr(
        type(backward_op), "__call__", lambda self, *a, **k: calls.append(self) or real_call(self, *a, **k)
    )
    _value_and_grads(public, leaves)
    assert backward_op not in calls  # the implementation was called directly
    _value_and_grads(through_op, leaves)
    assert backward_op in calls  # and the custom op's own rule still goes through the op (compile traces it)


def test_unused_outputs_get_no_zero_gradients(device):
    # h alone used downstream: the backward sees dy None and fills it itself; y alone: dh None is HAS_DH=False
    hx, hr = _leaf(5, 32, device=device, seed=8), _leaf(5, 32, device=device, seed=9)
    lw, lb = _leaf(32, device=device, seed=10), _leaf(32, device=device, seed=11)
    for pick in (0, 1):
        got = add_layer_norm_train(hx, hr, lw, lb, 1e-6, torch.float32)[pick]
        want = torch.ops.vithybrid.add_layer_norm_train(hx, hr, lw, lb, 1e-6, torch.float32)[pick]
        g = torch.autograd.grad(got.sum(), (hx, hr, lw, lb), allow_unused=True)
        w = torch.autograd.grad(want.sum(), (hx, hr, lw, lb), allow_unused=True)
        for a, b in zip(g, w, strict=True):
            assert (a is None and b is None) or (b is not None and torch.allclose(a, b, rtol=0, atol=1e-6))


def test_torch_compile_still_traces_the_custom_op(device):
    x = _leaf(2, 8, 4, 4, device=device)
    w, b = _leaf(8, device=device, seed=1), _leaf(8, device=device, seed=2)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(str(gm.graph))
        return gm.forward

    compiled = torch.compile(lambda t: group_norm_act(t, 4, w, b, 1e-5, "relu"), backend=backend, fullgraph=True)
    compiled(x).sum().backward()
    assert any("vithybrid.group_norm_act" in g for g in graphs), graphs
    assert x.grad is not None and torch.isfinite(x.grad).all()


class _DropGradient(torch.autograd.Function):
    """Passes its input on and returns no gradient for it: the node before it is reached with none."""

    @staticmethod
    def forward(ctx, t):
        return t.clone()

    @staticmethod
    def backward(ctx, grad):
        return None


@pytest.mark.parametrize("name", [c[0] for c in _cases("cpu")])
def test_a_node_reached_with_no_gradient_gives_none_as_the_custom_op_gives_zeros(name, device):
    # unmaterialized, every incoming gradient is None: the rule would pass None to a kernel
    (case,) = [c for c in _cases(device) if c[0] == name]
    _, public, through_op, leaves, _ = case
    for fn in (public, through_op):
        loss = _DropGradient.apply(fn()).sum() + sum(t.sum() for t in leaves)
        grads = torch.autograd.grad(loss, leaves)
        assert all(torch.equal(g, torch.ones_like(g)) for g in grads)  # the direct terms' only


@pytest.mark.parametrize("name", ["group_norm_act", "add_layer_norm_train", "flash_attention"])
def test_a_double_backward_fails_as_through_the_custom_op(name, device):
    # the backward's launches record no graph: differentiating it again must raise, not drop its part
    (case,) = [c for c in _cases(device) if c[0] == name]
    _, public, through_op, leaves, _ = case
    for fn in (public, through_op):
        (grad, *_) = torch.autograd.grad(fn().pow(2).sum(), leaves, create_graph=True)
        with pytest.raises(RuntimeError, match="no autograd formula"):  # the op's own message, both ways
            torch.autograd.grad((grad**2).sum() + leaves[0].pow(3).sum(), leaves[0])


def test_with_twins_off_eager_calls_take_the_custom_op(device, monkeypatch):
    # the switch bench_host_overhead's A/B uses: same call, the custom op's node instead of the twin's
    from vithybrid_fast.kernels import _eager

    x = _leaf(2, 8, 4, 4, device=device)
    assert "_eager" in type(group_norm_act(x, 4, None, None).grad_fn).__name__
    monkeypatch.setattr(_eager, "TWINS", False)
    assert "_eager" not in type(group_norm_act(x, 4, None, None).grad_fn).__name__


# -- from session 20's mutation audit: what the value checks above could not see --------------------------
def _add_ln_leaves(device, seed=8):
    return [_leaf(*shape, device=device, seed=seed + i) for i, shape in enumerate(((5, 32), (5, 32), (32,), (32,)))]


@pytest.mark.parametrize("pick", [0, 1])
def test_the_twin_hands_its_rule_none_for_unused_outputs(pick, monkeypatch, device):
    # materialize_grads=False is what lets the rule see None: dh None → HAS_DH=False (no zeros read), and
    # dy None → the rule's own fill. Kills: dropping ctx.set_materialize_grads (E3), or the add twin built
    # without materialize_grads=False (A9). (Session 20's mutation audit.)
    seen = []
    real = alnt.launch_backward

    def spy(dy, dh, *rest):
        seen.append((dy, dh))
        return real(dy, dh, *rest)

    monkeypatch.setattr(alnt, "launch_backward", spy)
    hx, hr, lw, lb = _add_ln_leaves(device)
    out = add_layer_norm_train(hx, hr, lw, lb, 1e-6, torch.float32)[pick]
    torch.autograd.grad(out.sum(), (hx, hr, lw, lb), allow_unused=True)
    ((dy, dh),) = seen
    if pick == 1:  # y used, h not: no gradient for h reaches the kernel
        assert dh is None
    else:  # h used, y not: dy is the rule's zero fill in y's dtype; dh is the upstream ones
        assert dh is not None and torch.equal(dh, torch.ones_like(dh)) and not dy.any()


def test_compiled_autograd_of_an_eager_step_traces_the_backward_op(device):
    # run(): a twin's backward traced by a compiler must call the op, not the launch (E7: the
    # is_compiling() exception dropped). Under compiled autograd the eager twin's backward is traced.
    from torch._dynamo import compiled_autograd

    hx, hr, lw, lb = _add_ln_leaves(device)
    _, y = add_layer_norm_train(hx, hr, lw, lb, 1e-6, torch.float32)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(str(gm.graph))
        return gm.forward

    with compiled_autograd._enable(torch.compile(backend=backend, fullgraph=True)):
        y.sum().backward()
    assert any("add_layer_norm_train_backward" in g for g in graphs), graphs
    want = torch.autograd.grad(
        torch.ops.vithybrid.add_layer_norm_train(hx, hr, lw, lb, 1e-6, torch.float32)[1].sum(), (hx, hr, lw, lb)
    )
    for got, exp in zip((hx.grad, hr.grad, lw.grad, lb.grad), want, strict=True):
        torch.testing.assert_close(got, exp)
