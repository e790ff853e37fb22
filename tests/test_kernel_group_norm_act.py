"""group_norm_act against the float64 reference, with plain torch in the same dtype as the peer."""

from __future__ import annotations

import dataclasses
import sys

import pytest
import torch
import torch.nn.functional as F
from vithybrid_fast.kernels import _group_norm_act_plan as plan_module
from vithybrid_fast.kernels._backbone_calls import group_norm_calls
from vithybrid_fast.kernels._group_norm_act_tiles import gpu_apply_configs, prune_apply
from vithybrid_fast.kernels._tuning import force_config
from vithybrid_fast.kernels.group_norm_act import group_norm_act, reference

from tests.tolerance import assert_close_to_reference

# The module itself: `kernels.group_norm_act` the attribute is the function, re-exported by the package.
gn_module = sys.modules["vithybrid_fast.kernels.group_norm_act"]

DTYPES = [torch.float32, torch.float16, torch.bfloat16]

CASES = [
    ((2, 12, 5, 7), 4),  # odd 5x7 spatial, 3 channels per group (not a power of two), C < tile
    ((2, 20, 3, 3), 4),  # 5 channels per group, 3x3
    ((1, 64, 3, 3), 32),  # BiT's 32 groups of 2 channels
    ((3, 8, 1, 1), 4),  # 1x1 spatial: two elements per group, batch 3
    ((1, 8, 24, 24), 2),  # S=576 (stage-3 spatial): several stats chunks and the Chan merge loop
    ((1, 4, 10, 16), 2),  # S=160: the last stats chunk ends in empty blocks (zero-count merges)
    ((2, 6, 9), 3),  # 3-D (N, C, L) input
]


@pytest.fixture(params=["single", "loop", "split"])
def path(request, monkeypatch) -> str:
    """Forces the forward path: single pass (x read once), one program per group sweeping it twice, or
    split statistics → apply (channels-last: per-channel statistics → finalize → apply)."""
    monkeypatch.setattr(gn_module, "_FORCE_PATH", request.param)
    return request.param


def torch_peer(x, num_groups, weight, bias, eps=1e-5, act="relu", residual=None):
    """What HF's BitGroupNormActivation (+ bottleneck add/relu) computes, in x's own dtype."""
    y = F.group_norm(x, num_groups, weight, bias, eps)
    if residual is not None:
        y = y + residual
    return torch.relu(y) if act == "relu" else y


def make_inputs(shape, dtype, device, seed=0, residual=True):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * 2 + 0.5).to(device, dtype)
    weight = (torch.rand(shape[1], generator=g) + 0.5).to(device, dtype)
    bias = (torch.randn(shape[1], generator=g) * 0.2).to(device, dtype)
    res = torch.randn(shape, generator=g).to(device, dtype) if residual else None
    return x, weight, bias, res


def check_forward(x, num_groups, weight, bias, act, residual):
    out = group_norm_act(x, num_groups, weight, bias, act=act, residual=residual)
    assert out.shape == x.shape and out.dtype == x.dtype
    peer = torch_peer(x, num_groups, weight, bias, act=act, residual=residual)
    as64 = [None if t is None else t.double() for t in (x, weight, bias, residual)]
    ref = reference(as64[0], num_groups, as64[1], as64[2], act=act, residual=as64[3])
    assert_close_to_reference(out, peer, ref, x.dtype)
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("shape", "num_groups"), CASES)
def test_forward_residual_relu(shape, num_groups, dtype, device, path):
    # The bottleneck tail relu(GN(x) + shortcut), every shape and dtype.
    x, w, b, res = make_inputs(shape, dtype, device)
    check_forward(x, num_groups, w, b, "relu", res)


@pytest.mark.parametrize("act", ["relu", None])
@pytest.mark.parametrize("residual", [False, True])
def test_forward_act_and_residual_options(act, residual, device, path):
    # norm1/norm2 (relu, no residual), downsample/norm3 alone (no act), and the fused tail.
    x, w, b, res = make_inputs((2, 12, 5, 7), torch.float16, device, residual=residual)
    check_forward(x, 4, w, b, act, res)


@pytest.mark.parametrize("x_channels_last", [False, True])
@pytest.mark.parametrize("res_channels_last", [False, True])
def test_channels_last_layouts(x_channels_last, res_channels_last, device, path):
    x, w, b, res = make_inputs((2, 12, 5, 7), torch.bfloat16, device)
    if x_channels_last:
        x = x.to(memory_format=torch.channels_last)
    if res_channels_last:
        res = res.to(memory_format=torch.channels_last)
    out = check_forward(x, 4, w, b, "relu", res)
    if x_channels_last:
        assert out.is_contiguous(memory_format=torch.channels_last)
    else:
        assert out.is_contiguous()


def test_non_dense_inputs_are_copied(device, path):
    x, w, b, res = make_inputs((2, 8, 6, 10), torch.float32, device)
    x, res = x[:, :, ::2], res[:, :, 1::2]  # strided views: neither NCHW nor channels-last dense
    out = check_forward(x, 4, w, b, "relu", res)
    assert out.is_contiguous()


def test_no_affine(device, path):
    x, _, _, res = make_inputs((2, 12, 5, 7), torch.float32, device)
    check_forward(x, 4, None, None, None, res)


@pytest.mark.parametrize("dtype", DTYPES)
# 4-D and more than one position: a 1×1 map is the same memory in both layouts and runs the NCHW passes
@pytest.mark.parametrize(
    ("shape", "num_groups"), [case for case in CASES if len(case[0]) == 4 and case[0][2:] != (1, 1)]
)
def test_channels_last_statistics_pass(shape, num_groups, dtype, device, monkeypatch):
    """Channels-last input takes per-channel statistics (`_gn_stats`: Welford per lane, lanes merged once)
    → finalize → apply: several chunks, odd loop counts (the unrolled loop's remainder) and chunks that
    end past the last position."""
    monkeypatch.setattr(gn_module, "_FORCE_PATH", "split")
    x, w, b, res = make_inputs(shape, dtype, device)
    x, res = (t.contiguous(memory_format=torch.channels_last) for t in (x, res))
    launched = []  # what the launcher really ran, not what the planner would do
    real = gn_module._gn_stats

    class Spy:
        def __getitem__(self, grid):
            launch = real[grid]

            def run(*args, **kwargs):
                launched.append(kwargs["CHANNELS_LAST"])
                return launch(*args, **kwargs)

            return run

    monkeypatch.setattr(gn_module, "_gn_stats", Spy())
    check_forward(x, num_groups, w, b, "relu", res)
    assert launched == [True]  # the channels-last statistics pass ran, once


@pytest.mark.parametrize("channels_last", [False, True])
def test_large_mean_statistics(device, path, channels_last):
    # |mean| / std = 1000 per group: E[x²] − E[x]² in float32 would give a var error of ~6%.
    torch.manual_seed(0)
    x = torch.randn(1, 8, 24, 24, device=device) + 1000.0
    if channels_last:  # split → the per-channel statistics pass
        x = x.contiguous(memory_format=torch.channels_last)
    w, b = torch.ones(8, device=device), torch.zeros(8, device=device)
    out = group_norm_act(x, 2, w, b, act=None)
    ref = reference(x.double(), 2, w.double(), b.double(), act=None)
    assert (out.double() - ref).abs().max().item() < 1e-3


def test_eps_is_used(device, path):
    x, w, b, _ = make_inputs((2, 12, 5, 7), torch.float32, device)
    x = x * 1e-2
    out = group_norm_act(x, 4, w, b, eps=1e-2)
    assert_close_to_reference(
        out, torch_peer(x, 4, w, b, eps=1e-2), reference(x.double(), 4, w.double(), b.double(), eps=1e-2), torch.float32
    )


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("residual", [False, True])
def test_paths_save_the_same_statistics(channels_last, residual, device, monkeypatch):
    # The backward is shared: both forward paths must hand it the same (N, G) float32 mean and rstd.
    x, w, b, res = make_inputs((2, 20, 5, 7), torch.float16, device, residual=residual)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    outs = {}
    for forced in ("single", "loop", "split"):
        monkeypatch.setattr(gn_module, "_FORCE_PATH", forced)
        outs[forced] = torch.ops.vithybrid.group_norm_act(x, 4, w, b, 1e-5, "relu", res)
    for forced in ("loop", "split"):
        for name, a, c in zip(("y", "mean", "rstd"), outs["single"], outs[forced]):
            assert a.shape == c.shape and a.dtype == c.dtype and a.stride() == c.stride(), (forced, name)
        torch.testing.assert_close(outs["single"][1], outs[forced][1], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(outs["single"][2], outs[forced][2], rtol=1e-5, atol=1e-5)
    # the statistics themselves, against float64 ones of the same float16 input
    groups = x.double().reshape(2, 4, -1)
    mean, var = groups.mean(-1), groups.var(-1, unbiased=False)
    torch.testing.assert_close(outs["single"][1].double(), mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(outs["single"][2].double(), (var + 1e-5).rsqrt(), rtol=1e-5, atol=1e-6)


def test_path_selection():
    # Under the interpreter the SM count is 1: fits and N·G ≥ 2 → single; a group over the tile → loop
    # (NCHW) or per-channel split (channels-last); one program → split.
    def choose(n, g, cg, s, channels_last=False, force=None):
        return plan_module.choose_path(n, g, cg, s, channels_last, 1, force)

    assert choose(2, 32, 8, 576) == "single"  # stage-3 mid: 8 × 1024
    assert choose(1, 32, 4, 2304) == "single"  # stage-2 mid: 4 × 4096
    assert choose(2, 32, 32, 576) == "loop"  # stage 3: 32 × 1024 > tile
    assert choose(2, 32, 32, 576, channels_last=True) == "split_channels"
    assert choose(1, 1, 2, 9) == "split"  # one program
    assert choose(2, 32, 8, 576, force="split") == "split"
    assert choose(2, 32, 8, 576, channels_last=True, force="loop") == "split_channels"
    with pytest.raises(ValueError, match="_FORCE_PATH"):
        choose(2, 32, 8, 576, force="bogus")


def run_grads(fn, inputs, grad_out, **kwargs):
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in inputs]
    x, w, b, res = leaves
    fn(x, kwargs.pop("num_groups"), w, b, residual=res, **kwargs).backward(grad_out.to(x.dtype))
    return [None if t is None else t.grad for t in leaves]


@pytest.mark.parametrize(
    ("shape", "num_groups", "dtype", "act", "residual", "channels_last"),
    [
        ((2, 12, 5, 7), 4, torch.float32, "relu", True, False),  # the fused tail, odd group size
        ((2, 12, 5, 7), 4, torch.bfloat16, "relu", True, True),  # channels-last, bfloat16
        ((1, 8, 24, 24), 2, torch.float16, "relu", False, False),  # several chunks, norm1/norm2 form
        ((1, 64, 3, 3), 32, torch.float32, None, True, True),  # 32 groups, no act, channels-last
        ((3, 8, 1, 1), 4, torch.float32, None, False, False),  # 1x1 spatial, plain GroupNorm
    ],
)
def test_backward(shape, num_groups, dtype, act, residual, channels_last, device, path):
    inputs = list(make_inputs(shape, dtype, device, residual=residual))
    if channels_last:
        inputs[0] = inputs[0].to(memory_format=torch.channels_last)
    grad_out = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(device)
    ours = run_grads(group_norm_act, inputs, grad_out, num_groups=num_groups, act=act)
    peer = run_grads(torch_peer, inputs, grad_out, num_groups=num_groups, act=act)
    as64 = [None if t is None else t.double() for t in inputs]
    ref = run_grads(reference, as64, grad_out.double(), num_groups=num_groups, act=act)
    for name, o, p, r in zip(("dx", "dweight", "dbias", "dresidual"), ours, peer, ref):
        if r is None:
            assert o is None
            continue
        assert o.dtype == dtype and o.shape == r.shape
        assert_close_to_reference(o, p, r, dtype, what=name)


def test_backward_only_residual_requires_grad(device):
    x, w, b, res = make_inputs((2, 12, 5, 7), torch.float32, device)
    res.requires_grad_()
    out = group_norm_act(x, 4, w, b, residual=res)
    out.sum().backward()
    torch.testing.assert_close(res.grad, (out > 0).float())


def test_no_grad_matches_grad_path(device, path):
    x, w, b, res = make_inputs((2, 12, 5, 7), torch.float32, device)
    w.requires_grad_()
    with torch.no_grad():
        a = group_norm_act(x, 4, w, b, residual=res)
    assert torch.equal(a, group_norm_act(x, 4, w, b, residual=res).detach())
    # and the shared result is right, not merely consistent (float32 in, float64 reference)
    exact = reference(x.double(), 4, w.detach().double(), b.double(), residual=res.double())
    torch.testing.assert_close(a.double(), exact, rtol=1e-5, atol=1e-5)


def bad_inputs():
    x = torch.randn(2, 12, 3, 3)
    w, b = torch.ones(12), torch.zeros(12)
    return [
        (dict(x=x, num_groups=5, weight=w, bias=b), ValueError, "divisible"),  # 12 channels, 5 groups
        (dict(x=x, num_groups=4, weight=torch.ones(8), bias=b), ValueError, "weight must have shape"),
        (dict(x=x, num_groups=4, weight=w, bias=torch.zeros(12, 1)), ValueError, "bias must have shape"),
        (dict(x=x.to(torch.int32), num_groups=4, weight=w, bias=b), TypeError, "dtype"),
        (dict(x=x, num_groups=4, weight=w, bias=b, residual=torch.randn(2, 12, 3, 4)), ValueError, "residual shape"),
        (dict(x=x, num_groups=4, weight=w, bias=b, act="gelu"), ValueError, "act must be"),
        (dict(x=torch.randn(12), num_groups=4, weight=w, bias=b), ValueError, r"\(N, C, \*spatial\)"),
    ]


@pytest.mark.parametrize(("kwargs", "error", "match"), bad_inputs())
def test_bad_inputs(kwargs, error, match, device):
    kwargs = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
    with pytest.raises(error, match=match):
        group_norm_act(**kwargs)


# ---------------------------------------------------------------------------------------------
# Every block and tile a GPU can take, forced one at a time under the interpreter (issue 14 item 1)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("shape", "num_groups"),
    [
        ((1, 4, 32, 32), 1),  # L = 4096: one full loop block, two full stats/apply blocks
        ((2, 4, 32, 32), 2),  # L = 2048: one partial loop block, one full stats/apply block
        ((1, 2, 65, 64), 1),  # L = 8320: 3 loop blocks, 5 stats/apply blocks, partial tails, 3 chunks
        ((1, 3, 5, 7), 3),  # L = 35: one partial block everywhere
    ],
)
@pytest.mark.parametrize("forced", ["loop", "split"])
def test_flat_paths_with_gpu_blocks(shape, num_groups, forced, device, monkeypatch):
    monkeypatch.setattr(gn_module, "_FORCE_GPU_BLOCKS", True)
    monkeypatch.setattr(gn_module, "_FORCE_PATH", forced)
    x, w, b, res = make_inputs(shape, torch.bfloat16, device)
    check_forward(x, num_groups, w, b, "relu", res)


@pytest.mark.parametrize("hints", [True, False])
def test_group_loop_sweep_candidates_compute_the_same(hints, device, monkeypatch):
    """bench/sweep_group_norm.py's hook: other loop blocks, warps and no L2 hints still compute GroupNorm."""
    from vithybrid_fast.kernels._group_norm_act_plan import INTERPRETER_BLOCKS

    blocks = dataclasses.replace(INTERPRETER_BLOCKS, loop=32, loop_warps=2, loop_l2_hints=hints)
    monkeypatch.setattr(gn_module, "_BLOCKS", blocks)
    monkeypatch.setattr(gn_module, "_FORCE_PATH", "loop")
    plans = []
    monkeypatch.setattr(gn_module, "forward_plan", lambda *a: plans.append(plan_module.forward_plan(*a)) or plans[-1])
    x, w, b, res = make_inputs((2, 4, 9, 10), torch.bfloat16, device)  # L = 180: 6 blocks, a partial tail
    check_forward(x, 2, w, b, "relu", res)
    launches = {(ln.kernel, ln.constexprs["BLOCK"], ln.num_warps) for p in plans for ln in p.launches}
    assert launches == {("_gn_fwd_group_loop", 32, 2)}  # the candidate ran, not the shipped blocks


def model_apply_configs(channels_last: bool) -> list:
    """The union of the (channel × spatial) tiles the GPU prune keeps at the base model's GroupNorm shapes."""
    kept = {}
    for call in group_norm_calls():
        args = {"C": call.channels, "S": call.s, "CHANNELS_LAST": channels_last}
        for cfg in prune_apply(gpu_apply_configs(), args):
            kept[(cfg.kwargs["BLOCK_C"], cfg.kwargs["BLOCK_S"], cfg.num_warps)] = cfg
    return [kept[k] for k in sorted(kept)]


def config_id(cfg) -> str:
    return f"{cfg.kwargs['BLOCK_C']}x{cfg.kwargs['BLOCK_S']}w{cfg.num_warps}"


def tail_shapes(cfg) -> list[tuple[int, int]]:
    """(C, S): two blocks per axis with a partial tail, then one partial block per axis (C stays even)."""
    bc, bs = cfg.kwargs["BLOCK_C"], cfg.kwargs["BLOCK_S"]
    return [(bc + 2, 2 * bs - 3), (max(bc // 2, 2), bs - 1)]


@pytest.mark.parametrize("cfg", model_apply_configs(channels_last=True), ids=config_id)
def test_channels_last_apply_each_gpu_config(cfg, device):
    with force_config("group_norm_act_apply", cfg):
        for c, s in tail_shapes(cfg):
            x, w, b, res = make_inputs((1, c, s), torch.float16, device)
            # (1, C, S) channels-last copies: memory (1, S, C)
            x, res = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (x, res))
            out = check_forward(x, 2, w, b, "relu", res)
            assert not out.is_contiguous()  # stayed channels-last: the per-channel split and its apply ran


@pytest.mark.parametrize("cfg", model_apply_configs(channels_last=True), ids=config_id)
def test_backward_apply_each_gpu_config(cfg, device):
    # The autotuned backward apply serves channels-last activations (NCHW takes the flat one-config apply).
    with force_config("group_norm_act_bwd_apply", cfg):
        for c, s in tail_shapes(cfg):
            inputs = list(make_inputs((1, c, s), torch.float32, device))
            inputs[0], inputs[3] = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (inputs[0], inputs[3]))
            grad_out = torch.randn(1, c, s, generator=torch.Generator().manual_seed(2)).to(device)
            ours = run_grads(group_norm_act, inputs, grad_out, num_groups=2, act="relu")
            peer = run_grads(torch_peer, inputs, grad_out, num_groups=2, act="relu")
            ref = run_grads(reference, [t.double() for t in inputs], grad_out.double(), num_groups=2, act="relu")
            for name, o, p, r in zip(("dx", "dweight", "dbias", "dresidual"), ours, peer, ref):
                assert_close_to_reference(o, p, r, torch.float32, what=name)


# ---------------------------------------------------------------------------------------------
# Low-variance groups, where eps decides the result, checked group by group (issue 14 item 4)
# ---------------------------------------------------------------------------------------------
def low_variance_inputs(dtype, device, channels_last=False):
    """(2, 8, 6, 6), 4 groups of 2 channels per image: variance ~1, ~1e-6, exactly 0, ~1e-6 around 0.5."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 8, 6, 6, generator=g)
    x[:, 2:4] *= 1e-3  # variance 1e-6 < eps = 1e-5: eps sets the scale
    x[:, 4:6] = 0.3  # exactly constant: x − mean = 0, output = bias
    x[:, 6:8] = 0.5 + 1e-3 * x[:, 6:8]  # the same around a mean ≫ std
    x = x.to(device, dtype)
    w = (torch.rand(8, generator=g) + 0.5).to(device, dtype)
    b = (torch.randn(8, generator=g) * 0.2).to(device, dtype)
    res = (torch.randn(2, 8, 6, 6, generator=g) * 0.1).to(device, dtype)
    if channels_last:
        x, res = x.to(memory_format=torch.channels_last), res.to(memory_format=torch.channels_last)
    return x, w, b, res


def assert_close_per_group(out, peer, ref, num_groups, dtype):
    n, c = out.shape[:2]
    for i in range(n):
        for grp in range(num_groups):
            sl = (i, slice(grp * c // num_groups, (grp + 1) * c // num_groups))
            assert_close_to_reference(out[sl], peer[sl], ref[sl], dtype, what=f"image {i} group {grp}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_low_variance_groups_eps(dtype, channels_last, device, path):
    x, w, b, res = low_variance_inputs(dtype, device, channels_last)
    out = group_norm_act(x, 4, w, b, eps=1e-5, residual=res)
    peer = torch_peer(x, 4, w, b, eps=1e-5, residual=res)
    ref = reference(x.double(), 4, w.double(), b.double(), eps=1e-5, residual=res.double())
    assert_close_per_group(out, peer, ref, 4, dtype)
    # The check has teeth: the same kernel with eps tenfold fails it on each low-variance group.
    wrong = group_norm_act(x, 4, w, b, eps=1e-4, residual=res)
    for channels in (slice(2, 4), slice(6, 8)):
        with pytest.raises(AssertionError):
            assert_close_to_reference(wrong[:, channels], peer[:, channels], ref[:, channels], dtype)


@pytest.mark.parametrize("shape", [(2, 8, 9, 11), (1, 8, 24, 24)], ids=["one-block", "several-chunks"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_constant_groups_give_the_bias_exactly(device, path, shape, channels_last):
    # The corrected mean (Σx / n + Σ(x − Σx / n) / n, also when lanes or chunks are merged) of a constant
    # is the constant, so x − mean = 0 and y = b exactly, though rstd = 1/sqrt(eps) ≈ 316 would magnify
    # any residue.
    x = torch.full(shape, 0.3, device=device)  # not a dyadic number: Σx / n rounds
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w, b = torch.rand(8, device=device) + 0.5, torch.randn(8, device=device)
    out = group_norm_act(x, 4, w, b, act=None)
    torch.testing.assert_close(out, b[None, :, None, None].expand_as(out), rtol=0, atol=0)


# The GPU's per-channel reduction tiles (channels-last statistics → finalize, and the backward's
# reduction) and the flat backward apply, forced under the interpreter: 128- and 64-channel tiles,
# NCHW 8 × 64 (C < 32), partial tails.
@pytest.mark.parametrize(
    ("shape", "num_groups", "channels_last"),
    [
        ((1, 130, 40), 2, True),  # 128-channel tile + a 2-channel tail; 16-position blocks, partial third
        ((1, 64, 37), 32, True),  # the whole C in one 64-wide tile; 32-position blocks, partial second
        ((1, 6, 1000), 2, False),  # NCHW: 8 × 64 tiles (2 rows masked), a partial 16th S-block; L = 3000
    ],
)
def test_gpu_reduction_tiles(shape, num_groups, channels_last, device, monkeypatch):
    monkeypatch.setattr(gn_module, "_FORCE_GPU_BLOCKS", True)
    monkeypatch.setattr(gn_module, "_FORCE_PATH", "split")  # channels-last: statistics, finalize, apply
    inputs = list(make_inputs(shape, torch.float32, device))
    if channels_last:
        inputs[0], inputs[3] = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (inputs[0], inputs[3]))
    check_forward(*inputs[:1], num_groups, *inputs[1:3], "relu", inputs[3])
    grad_out = torch.randn(shape, generator=torch.Generator().manual_seed(5)).to(device)
    ours = run_grads(group_norm_act, inputs, grad_out, num_groups=num_groups, act="relu")
    peer = run_grads(torch_peer, inputs, grad_out, num_groups=num_groups, act="relu")
    ref = run_grads(reference, [t.double() for t in inputs], grad_out.double(), num_groups=num_groups, act="relu")
    for name, o, p, r in zip(("dx", "dweight", "dbias", "dresidual"), ours, peer, ref):
        assert_close_to_reference(o, p, r, torch.float32, what=name)


# -- from session 20's mutation audit: signed weights, no affine, an empty batch, a ragged tile ----------
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("act", ["relu", None])
def test_backward_with_negative_weights(channels_last, act, device):
    # the coefficients are Σ gz·w and Σ gz·w·x̂: a weight's sign must reach them (kills `weight.abs()` in
    # launch_backward's bookkeeping, or a kernel that loses w's sign in its forward)
    g = torch.Generator().manual_seed(11)
    x = (torch.randn(2, 12, 5, 7, generator=g) * 2 + 0.5).to(device)
    w = torch.randn(12, generator=g).to(device)
    w[::2] = -w[::2].abs() - 0.2  # half the channels negative, none near zero
    b = (torch.randn(12, generator=g) * 0.2).to(device)
    res = torch.randn(2, 12, 5, 7, generator=g).to(device)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    inputs = [x, w, b, res]
    grad_out = torch.randn(2, 12, 5, 7, generator=torch.Generator().manual_seed(12)).to(device)
    ours = run_grads(group_norm_act, inputs, grad_out, num_groups=4, act=act)
    peer = run_grads(torch_peer, inputs, grad_out, num_groups=4, act=act)
    ref = run_grads(reference, [t.double() for t in inputs], grad_out.double(), num_groups=4, act=act)
    for name, o, p, r in zip(("dx", "dweight", "dbias", "dresidual"), ours, peer, ref, strict=True):
        assert_close_to_reference(o, p, r, torch.float32, what=name)


def test_an_empty_batch_backward_gives_zero_gradients_in_separate_tensors(device):
    # launch_backward's numel() == 0 early return: untested before (kills returning None for the residual's
    # gradient there, or dw and db as one tensor, which a custom op may not return)
    from vithybrid_fast.kernels import _group_norm_act_backward as gnb

    x = torch.randn(0, 8, 3, 3, device=device, requires_grad=True)
    r = torch.randn(0, 8, 3, 3, device=device, requires_grad=True)
    w = torch.ones(8, device=device, requires_grad=True)
    b = torch.zeros(8, device=device, requires_grad=True)
    group_norm_act(x, 4, w, b, residual=r).sum().backward()
    assert x.grad.shape == x.shape and r.grad is not None and r.grad.shape == r.shape
    assert torch.equal(w.grad, torch.zeros(8, device=device)) and torch.equal(b.grad, torch.zeros(8, device=device))
    mean = rstd = torch.zeros(0, 4, device=device)
    gx, gz, dw, db = gnb.launch_backward(x.detach(), None, x.detach(), w.detach(), mean, rstd, relu=False,
                                         need_gz=True, sm_count=1, small_blocks=True)  # fmt: skip
    assert gx.shape == x.shape and not gx.any()
    assert gz is not None and gz.shape == x.shape
    assert dw.untyped_storage().data_ptr() != db.untyped_storage().data_ptr()


@pytest.mark.parametrize("channels_last", [False, True])
def test_backward_without_affine(channels_last, device):
    # weight=None, bias=None: the backward's stand-in weight must be ones (kills any other stand-in; only the
    # forward of the no-affine case was tested)
    g = torch.Generator().manual_seed(13)
    x = (torch.randn(2, 12, 5, 7, generator=g) * 2 + 0.5).to(device)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    grad_out = torch.randn(2, 12, 5, 7, generator=g).to(device)
    inputs = [x, None, None, None]
    ours = run_grads(group_norm_act, inputs, grad_out, num_groups=4, act="relu")
    peer = run_grads(torch_peer, inputs, grad_out, num_groups=4, act="relu")
    ref = run_grads(reference, [x.double(), None, None, None], grad_out.double(), num_groups=4, act="relu")
    assert_close_to_reference(ours[0], peer[0], ref[0], torch.float32, what="dx")


def test_nchw_backward_apply_covers_a_ragged_last_tile(device):
    # each group's span (CG·S = 3·63 = 189) is more than one interpreter apply block (128) and not a multiple
    # of it: the last tile is partial (kills cdiv → floor in launch_backward's tile count; every existing
    # NCHW backward shape had a span ≤ 128 or a multiple of 128)
    g = torch.Generator().manual_seed(14)
    x = (torch.randn(2, 6, 7, 9, generator=g) * 2 + 0.5).to(device)
    w = (torch.rand(6, generator=g) + 0.5).to(device)
    b = (torch.randn(6, generator=g) * 0.2).to(device)
    res = torch.randn(2, 6, 7, 9, generator=g).to(device)
    inputs = [x, w, b, res]
    grad_out = torch.randn(2, 6, 7, 9, generator=g).to(device)
    ours = run_grads(group_norm_act, inputs, grad_out, num_groups=2, act="relu")
    peer = run_grads(torch_peer, inputs, grad_out, num_groups=2, act="relu")
    ref = run_grads(reference, [t.double() for t in inputs], grad_out.double(), num_groups=2, act="relu")
    for name, o, p, r in zip(("dx", "dweight", "dbias", "dresidual"), ours, peer, ref, strict=True):
        assert_close_to_reference(o, p, r, torch.float32, what=name)
