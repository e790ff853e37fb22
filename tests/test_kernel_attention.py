"""Parity of kernels.attention.flash_attention (FlashAttention-2 forward + backward, custom op).

Every value check uses the tolerance idiom: kernel error vs a float64 reference ≤ 2 × the error of plain
torch in the same dtype + atol. Shapes are small so the Triton interpreter finishes quickly on a CPU;
on a CUDA machine the same tests run natively (and the float32 cases then prove no TF32 is used: TF32
errors are ~1e-3, far above the float32 bound).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tolerance import assert_close_to_reference
from vithybrid_fast.kernels import _attention_tiles as tiles
from vithybrid_fast.kernels import attention
from vithybrid_fast.kernels.attention import flash_attention, reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp32", "fp16", "bf16"]
# Under the interpreter numpy warns about inf/NaN in padded key rows of the dK/dV tiles; the kernel
# computes and discards those rows by design (see _attn_bwd_dkdv), and every stored value is checked.
pytestmark = [
    pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
]


def _eager(q, k, v, scale=None):
    """Plain torch in q.dtype: what a user would run without our kernel."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return torch.softmax(q @ k.transpose(-2, -1) * scale, dim=-1) @ v


def _randn(shape, dtype, device, generator, scale=1.0):
    return (torch.randn(shape, generator=generator) * scale).to(device=device, dtype=dtype)


def _make_qkv(shape, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(_randn(shape, dtype, device, g).requires_grad_() for _ in range(3))


def _check_forward_and_grads(q, k, v, scale, dtype, seed=1, factor=2.0):
    """Forward and dq/dk/dv of the kernel vs plain torch (same dtype) vs float64, for leaf q, k, v."""
    out = flash_attention(q, k, v, scale)
    assert out.shape == q.shape and out.dtype == dtype
    assert out.transpose(1, 2).is_contiguous()  # token-major: the model's reshape to (B, N, H·D) is free
    torch_out = _eager(q, k, v, scale)
    ref_inputs = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref_out = reference(*ref_inputs, scale)
    assert_close_to_reference(out, torch_out, ref_out, dtype, factor=factor, what="output")

    grad_out = _randn(out.shape, dtype, out.device, torch.Generator().manual_seed(seed))
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    torch_grads = torch.autograd.grad(torch_out, (q, k, v), grad_out)
    ref_grads = torch.autograd.grad(ref_out, ref_inputs, grad_out.double())
    for name, g, tg, rg in zip(("dq", "dk", "dv"), grads, torch_grads, ref_grads):
        assert g.shape == q.shape and g.dtype == dtype
        assert_close_to_reference(g, tg, rg, dtype, factor=factor, what=name)


class _LaunchSpy:
    """Stands in for an autotuned kernel: records the tensors each launch receives, then launches."""

    def __init__(self, kernel):
        self.kernel = kernel
        self.launches: list[tuple[torch.Tensor, ...]] = []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append(tuple(a for a in args if isinstance(a, torch.Tensor)))
            return self.kernel[grid](*args, **kwargs)

        return launch


def _same_memory(received: torch.Tensor, given: torch.Tensor) -> bool:
    return received.data_ptr() == given.data_ptr() and received.stride() == given.stride()


SHAPES = [
    (1, 1, 1, 64),  # N=1: a single key, softmax is exactly 1; everything else is padding
    (2, 3, 50, 32),  # N=50 (ViT-Base at 112px): not a multiple of the block, ends in a partial block
    (1, 2, 64, 64),  # N a multiple of the block: no partial tail block at all
    (2, 2, 130, 64),  # several key blocks (online-softmax rescaling) and a 2-column tail
    (1, 2, 197, 128),  # N=197 (ViT at 224px: 196 patches + CLS) with the largest head dim
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("scale", [None, 1.0])  # None: D**-0.5; 1.0: sharper softmax, bigger logits
def test_forward_and_backward(shape, dtype, scale, device):
    q, k, v = _make_qkv(shape, dtype, device)
    _check_forward_and_grads(q, k, v, scale, dtype)


# bfloat16 gets factor 4: keys sharing a large offset make dq = Σ ds·k cancel, which exposes the
# rounding of δ = rowsum(dO·O) taken from the bf16-rounded O (FlashAttention-2 does the same).
@pytest.mark.parametrize(
    "dtype, factor", [(torch.float32, 2.0), (torch.float16, 2.0), (torch.bfloat16, 4.0)], ids=DTYPE_IDS
)
def test_very_negative_logits_keep_padded_keys_out(dtype, factor, device):
    # All logits ≈ -290: lse ≈ -420 (base 2), so a padded key's exp2(0 - lse) overflows to inf. Without
    # the tail mask that inf would turn whole dq rows into NaN (inf · 0 in ds @ k).
    g = torch.Generator().manual_seed(0)
    shape = (1, 2, 50, 32)
    q = (3.0 + 0.01 * torch.randn(shape, generator=g)).to(device=device, dtype=dtype).requires_grad_()
    k = (-3.0 + 0.01 * torch.randn(shape, generator=g)).to(device=device, dtype=dtype).requires_grad_()
    v = _randn(shape, dtype, device, g).requires_grad_()
    _check_forward_and_grads(q, k, v, 1.0, dtype, factor=factor)


def test_vit_hybrid_384_sequence(device):
    # N=577 (576 patches + CLS at 384px), the checkpoint's real length: many blocks and a 1-key tail.
    q, k, v = _make_qkv((1, 1, 577, 64), torch.float16, device, seed=3)
    _check_forward_and_grads(q, k, v, None, torch.float16)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_packed_qkv_views_are_read_in_place(dtype, device, monkeypatch):
    # The encoder's layout: one projection to (B, N, 3, H, D), q/k/v as (B, H, N, D) strided views.
    B, N, H, D = 2, 50, 3, 32
    g = torch.Generator().manual_seed(0)
    qkv = _randn((B, N, 3 * H * D), dtype, device, g).view(B, N, 3, H, D).requires_grad_()
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    assert not any(t.is_contiguous() for t in (q, k, v))
    fwd_spy = _LaunchSpy(attention._attn_fwd_tuned)
    dkdv_spy = _LaunchSpy(attention._attn_bwd_dkdv_tuned)
    monkeypatch.setattr(attention, "_attn_fwd_tuned", fwd_spy)
    monkeypatch.setattr(attention, "_attn_bwd_dkdv_tuned", dkdv_spy)

    out = flash_attention(q, k, v)
    # The kernel got the views themselves (same address and strides): no copy was made on the way.
    assert len(fwd_spy.launches) == 1
    assert all(_same_memory(r, t) for r, t in zip(fwd_spy.launches[0][:3], (q, k, v)))

    torch_out = _eager(q, k, v)
    ref_qkv = qkv.detach().double().requires_grad_()
    ref_out = reference(*(ref_qkv[:, :, i].transpose(1, 2) for i in range(3)))
    assert_close_to_reference(out, torch_out, ref_out, dtype, what="output")

    # The model consumes the output as (B, N, H·D), so the incoming gradient is a strided view too.
    grad = _randn((B, N, H * D), dtype, device, g)
    (grad_qkv,) = torch.autograd.grad(out.transpose(1, 2).reshape(B, N, H * D), qkv, grad)
    (torch_grad_qkv,) = torch.autograd.grad(torch_out.transpose(1, 2).reshape(B, N, H * D), qkv, grad)
    (ref_grad_qkv,) = torch.autograd.grad(ref_out.transpose(1, 2).reshape(B, N, H * D), ref_qkv, grad.double())
    assert_close_to_reference(grad_qkv, torch_grad_qkv, ref_grad_qkv, dtype, what="dqkv")
    received_q, received_k, received_v, received_do = dkdv_spy.launches[0][:4]
    assert all(_same_memory(r, t) for r, t in zip((received_q, received_k, received_v), (q, k, v)))
    assert not received_do.is_contiguous()  # read through its strides, not copied


def test_last_dim_not_unit_stride_is_copied_and_correct(device):
    # A (B, H, D, N) buffer seen as (B, H, N, D): the one layout the kernel does not read in place.
    q, k, v = (
        t.detach().transpose(-1, -2).contiguous().transpose(-1, -2)
        for t in _make_qkv((1, 2, 40, 32), torch.float32, device)
    )
    assert q.stride(-1) != 1
    out = flash_attention(q, k, v)
    ref_out = reference(q.double(), k.double(), v.double())
    assert_close_to_reference(out, _eager(q, k, v), ref_out, torch.float32)


@settings(
    max_examples=8,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    batch=st.integers(1, 2),
    heads=st.integers(1, 2),
    seq_len=st.integers(1, 80),
    head_dim=st.sampled_from([32, 64]),
    dtype=st.sampled_from(DTYPES),
    scale=st.one_of(st.none(), st.floats(0.05, 1.0)),
)
def test_random_shapes_property(batch, heads, seq_len, head_dim, dtype, scale, device):
    q, k, v = _make_qkv((batch, heads, seq_len, head_dim), dtype, device, seed=seq_len)
    _check_forward_and_grads(q, k, v, scale, dtype)


def test_torch_compile_fullgraph_keeps_one_op_node(device):
    B, N, H, D = 2, 50, 2, 32
    g = torch.Generator().manual_seed(0)
    x = _randn((B, N, H * D), torch.float32, device, g)
    weight = _randn((3 * H * D, H * D), torch.float32, device, g, scale=(H * D) ** -0.5)

    def block(x, weight):
        qkv = (x @ weight.T).view(B, N, 3, H, D)
        q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))  # (B, H, N, D) views
        return flash_attention(q, k, v).transpose(1, 2).reshape(B, N, H * D)

    graphs = []

    def recording_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    # fullgraph=True raises on any graph break; the op must appear as a single opaque node.
    compiled = torch.compile(block, fullgraph=True, backend=recording_backend)
    expected = block(x, weight)
    torch.testing.assert_close(compiled(x, weight), expected, rtol=0, atol=0)
    qkv = (x.double() @ weight.double().T).view(B, N, 3, H, D)
    exact = reference(*(qkv[:, :, i].transpose(1, 2) for i in range(3))).transpose(1, 2).reshape(B, N, H * D)
    torch.testing.assert_close(expected.double(), exact, rtol=1e-4, atol=1e-5)  # right, not only consistent
    targets = [str(node.target) for node in graphs[0].graph.nodes if node.op == "call_function"]
    assert sum("vithybrid.flash_attention" in t for t in targets) == 1, targets

    # aot_eager also traces the backward (the registered autograd formula, another custom op).
    weight_eager = weight.clone().requires_grad_()
    weight_compiled = weight.clone().requires_grad_()
    block(x, weight_eager).square().sum().backward()
    torch.compile(block, fullgraph=True, backend="aot_eager")(x, weight_compiled).square().sum().backward()
    torch.testing.assert_close(weight_compiled.grad, weight_eager.grad, rtol=1e-5, atol=1e-6)
    weight_exact = weight.double().requires_grad_()
    qkv = (x.double() @ weight_exact.T).view(B, N, 3, H, D)
    out = reference(*(qkv[:, :, i].transpose(1, 2) for i in range(3))).transpose(1, 2).reshape(B, N, H * D)
    out.square().sum().backward()
    torch.testing.assert_close(weight_eager.grad.double(), weight_exact.grad, rtol=1e-4, atol=1e-4)


def _qkv(shape=(1, 2, 8, 32), dtype=torch.float32, device="cpu"):
    return [torch.randn(shape).to(device=device, dtype=dtype) for _ in range(3)]


def test_rejects_wrong_rank(device):
    q, k, v = _qkv(device=device)
    with pytest.raises(ValueError, match="4-D"):
        flash_attention(q[0], k[0], v[0])


def test_rejects_mismatched_shapes(device):
    q, k, v = _qkv(device=device)
    with pytest.raises(ValueError, match="one shape"):
        flash_attention(q, k[:, :, :4], v)


@pytest.mark.parametrize("head_dim", [48, 256])  # not a power of two / above 128
def test_rejects_unsupported_head_dim(head_dim, device):
    with pytest.raises(ValueError, match=f"head dim D={head_dim} is not supported"):
        flash_attention(*_qkv((1, 1, 8, head_dim), device=device))


def test_rejects_integer_and_mixed_dtypes(device):
    q, k, v = _qkv(device=device)
    with pytest.raises(TypeError, match="not supported"):
        flash_attention(q.to(torch.int32), k.to(torch.int32), v.to(torch.int32))
    with pytest.raises(TypeError, match="share a dtype"):
        flash_attention(q, k.half(), v)


def test_rejects_empty_sequence(device):
    with pytest.raises(ValueError, match="at least 1"):
        flash_attention(*_qkv((1, 1, 0, 32), device=device))


def test_reference_matches_sdpa():
    q, k, v = (t.double() for t in _qkv((2, 3, 17, 32)))
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=0.3)
    torch.testing.assert_close(reference(q, k, v, 0.3), expected)


@pytest.mark.parametrize("n", [1, 50, 197, 577, 4096])
@pytest.mark.parametrize("elem_bytes", [4, 2], ids=["fp32", "16bit"])
@pytest.mark.parametrize("kind", ["fwd", "dkdv", "dq"])
@pytest.mark.parametrize("sm_count", [108, 132], ids=["A100", "H100"])
def test_gpu_config_pruning(n, elem_bytes, kind, sm_count):
    # Pure Python: the GPU autotune space, pruned per N bucket, is never empty, never all padding,
    # holds at most two candidates, and only the dtype's own family (fp32 never gets the big tiles).
    all_configs = tiles.CONFIGS[kind]
    family = set(tiles.TILES[kind]["fp32" if elem_bytes == 4 else "half"])
    for head_dim in attention.SUPPORTED_HEAD_DIMS:
        for batch in (1, 2, 8, 64, 128):
            kept = tiles.select_configs(kind, all_configs, n, head_dim, batch * 12, elem_bytes, sm_count)
            assert 1 <= len(kept) <= 2 and set(map(id, kept)) <= set(map(id, all_configs))
            assert all(c.kwargs["BLOCK_M"] <= max(16, tiles.n_bucket(n)) for c in kept)
            assert all((c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) in family for c in kept)


@pytest.mark.parametrize(("kind", "batch", "sm_count", "expected"), [
    # forward: both 16-bit tiles are always kept at N=577; the batch orders them (most programs first while
    # none fills the SMs, the largest tile first once they do)
    ("fwd", 1, 132, [(64, 64), (128, 64)]),  # 12·cdiv(577, 64) = 120 < 132 SMs: none fills
    ("fwd", 8, 132, [(128, 64), (64, 64)]),  # 480 programs fill an H100: the largest tile first
    ("fwd", 64, 108, [(128, 64), (64, 64)]),
    # dQ has three tiles: the batch changes which two are benchmarked
    ("dq", 1, 132, [(64, 64), (64, 32)]),  # the two giving the most programs (120 each)
    ("dq", 8, 132, [(128, 32), (64, 64)]),  # all fill: the two largest, fewer programs first
    ("dq", 64, 108, [(128, 32), (64, 64)]),
])  # fmt: skip
def test_the_prune_follows_the_batch(kind, batch, sm_count, expected):
    # The batch bucket is part of the autotune key, so batch 1 and batch 64 are tuned apart.
    kept = tiles.select_configs(kind, tiles.CONFIGS[kind], 577, 64, batch * 12, 2, sm_count)
    assert [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) for c in kept] == expected


def test_autotune_key_includes_the_batch_bucket():
    for kernel in (attention._attn_fwd_tuned, attention._attn_bwd_dkdv_tuned, attention._attn_bwd_dq_tuned):
        assert "B_BUCKET" in kernel.key and "N_BUCKET" in kernel.key


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=DTYPE_IDS[1:])
def test_vit_base_batch_on_gpu(dtype, device):
    # The benchmark shape at batch 8: exercises the autotuned GPU configs end to end.
    q, k, v = _make_qkv((8, 12, 577, 64), dtype, device, seed=5)
    _check_forward_and_grads(q, k, v, None, dtype)


def test_opcheck_token_major_output(device):
    """The fake implementation must match the real output's token-major strides (opcheck compares them)."""
    q, k, v = (torch.randn(1, 2, 37, 32, device=device, requires_grad=True) for _ in range(3))
    result = torch.library.opcheck(torch.ops.vithybrid.flash_attention.default, (q, k, v, 32**-0.5))
    assert set(result.values()) == {"SUCCESS"}, result


# Issue 14 item 1: the interpreter normally runs one small tile, so a bug that shows only with another
# BLOCK_M/BLOCK_N (a grid sized with the wrong block, a mask that holds only for square blocks, an
# unwritten tail) would pass here and break on a GPU. Each config the GPU autotuner can choose runs once,
# forced, at lengths hitting a single partial block (1, 63), exact blocks (64) and a 1-row tail (65).
def _forced_cases():
    for kind, configs in tiles.CONFIGS.items():
        for cfg in configs:
            bm, bn = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"]
            is_fp32 = (bm, bn, cfg.num_warps, cfg.num_stages) in tiles.TILES[kind]["fp32"]
            yield pytest.param(
                kind,
                cfg,
                torch.float32 if is_fp32 else torch.float16,
                id=f"{kind}-{bm}x{bn}-w{cfg.num_warps}-s{cfg.num_stages}",
            )


@pytest.mark.parametrize(("kind", "config", "dtype"), list(_forced_cases()))
def test_every_gpu_config_forced(kind, config, dtype, device):
    from vithybrid_fast.kernels._tuning import force_config

    tuned = {
        "fwd": attention._attn_fwd_tuned,
        "dkdv": attention._attn_bwd_dkdv_tuned,
        "dq": attention._attn_bwd_dq_tuned,
    }
    with force_config(f"attention_{kind}", config):
        for n in (1, 63, 64, 65):
            q, k, v = _make_qkv((1, 2, n, 32), dtype, device, seed=n)
            if kind == "fwd":
                out = flash_attention(q.detach(), k.detach(), v.detach())
                ref = reference(*(t.detach().double() for t in (q, k, v)))
                assert_close_to_reference(out, _eager(q, k, v).detach(), ref, dtype, what=f"output N={n}")
            else:
                _check_forward_and_grads(q, k, v, None, dtype)
            assert tuned[kind].autotuner.best_config is config  # the forced tile is the one that ran


def test_forced_configs_at_the_model_length(device):
    # N=577 with the largest 16-bit tile of each kernel: many full blocks plus a 1-row tail.
    from vithybrid_fast.kernels._tuning import force_config

    def biggest(kind):
        t = max(tiles.TILES[kind]["half"], key=lambda t: t[0] * t[1])
        return next(c for c in tiles.CONFIGS[kind] if (*c.kwargs.values(), c.num_warps, c.num_stages) == t)

    forced = [force_config(f"attention_{kind}", biggest(kind)) for kind in ("fwd", "dkdv", "dq")]
    with forced[0], forced[1], forced[2]:
        q, k, v = _make_qkv((1, 1, 577, 32), torch.float16, device, seed=7)
        _check_forward_and_grads(q, k, v, None, torch.float16)


def test_force_config_rejects_a_foreign_config():
    import triton
    from vithybrid_fast.kernels._tuning import force_config

    with (
        pytest.raises(ValueError, match="not one of its configs"),
        force_config("attention_fwd", triton.Config({"BLOCK_M": 8, "BLOCK_N": 8}, num_warps=1)),
    ):
        pass
