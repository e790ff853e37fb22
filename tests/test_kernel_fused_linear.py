"""Parity of kernels.fused_linear (LN stats + GEMM with LN prologue / bias·GELU·residual epilogue).

Every case uses the tolerance idiom: kernel error vs a float64 reference ≤ 2 × plain-torch error in the
same dtype + atol. Shapes are small so the Triton interpreter finishes quickly on a CPU.
Under the Triton 3.6 interpreter a float32 → bfloat16 cast truncates (GPUs round to nearest even), so
bf16 kernel errors read ~2-3× torch's here and pass through the idiom's atol; with round-to-nearest
emulated they are ≤ torch's.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tolerance import assert_close_to_reference
from vithybrid_fast.kernels import _fused_linear_tiles as fl_tiles
from vithybrid_fast.kernels.fused_linear import fused_linear, layer_norm_stats, reference, reference_layer_norm_stats

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _eager(x, weight, bias=None, ln=None, activation=None, residual=None, eps=1e-5):
    """Plain torch in x.dtype: what a user would run without our kernels."""
    if ln is not None:
        x = F.layer_norm(x, (x.shape[-1],), ln[0], ln[1], eps)
    y = F.linear(x, weight, bias)
    if activation == "gelu":
        y = F.gelu(y)
    return y + residual if residual is not None else y


def _make(shape, n, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    k = shape[-1]

    def rand(*s, scale=1.0, shift=0.0):
        return (torch.randn(*s, generator=g) * scale + shift).to(device=device, dtype=dtype)

    return {
        "x": rand(*shape, shift=0.5),
        "weight": rand(n, k, scale=k**-0.5),
        "bias": rand(n, scale=0.1),
        "ln_w": rand(k, scale=0.2, shift=1.0),
        "ln_b": rand(k, scale=0.1),
        "residual": rand(*shape[:-1], n),
    }


@pytest.mark.parametrize(
    "shape",
    [
        (37, 48),  # odd M, K not a multiple of the block
        (1154, 32),  # 2·577 rows (two ViT images), many row blocks
        (5, 5000),  # K > one 4096 chunk: chunk statistics are merged
        (2, 37, 48),  # 3-D input (B, N, D)
    ],
)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("eps", [1e-12, 1e-5])  # 1e-12: the hub checkpoint's LayerNorm eps
def test_layer_norm_stats(shape, dtype, eps, device):
    x = (torch.randn(shape) * 2 + 3).to(device=device, dtype=dtype)
    mean, rstd = layer_norm_stats(x, eps)
    assert mean.shape == rstd.shape == x.shape[:-1] and mean.dtype == rstd.dtype == torch.float32
    ref_mean, ref_rstd = reference_layer_norm_stats(x.double(), eps)
    torch_mean, torch_rstd = reference_layer_norm_stats(x.float(), eps)
    assert_close_to_reference(mean, torch_mean, ref_mean, torch.float32, what="mean")
    assert_close_to_reference(rstd, torch_rstd, ref_rstd, torch.float32, what="rstd")


def test_layer_norm_stats_large_offset(device):
    # |mean| ≫ std: a one-pass E[x²] − mean² would lose most digits of the variance here.
    x = (torch.randn(7, 5000, dtype=torch.float64) + 1000.0).to(device=device, dtype=torch.float32)
    _, rstd = layer_norm_stats(x, 1e-12)
    _, ref_rstd = reference_layer_norm_stats(x.double(), 1e-12)
    torch.testing.assert_close(rstd.double(), ref_rstd.to(rstd.device), rtol=1e-4, atol=0)


# (x shape, N, use LN prologue, activation, has bias, has residual)
LINEAR_CASES = [
    ((37, 48), 80, True, "gelu", True, False),  # MLP fc1 shape: LN + bias + GELU, odd M/K/N edges
    ((37, 80), 48, False, None, True, True),  # MLP fc2 shape: bias + residual epilogue
    ((37, 48), 80, False, None, False, False),  # bare GEMM, bias None
    ((37, 48), 80, True, None, False, True),  # LN with no bias, residual on
    ((1154, 32), 64, True, "gelu", True, True),  # 2·577 rows, K and N multiples of the block
    ((2, 37, 48), 80, True, "gelu", True, True),  # 3-D input, everything fused
    ((1, 17), 5, False, "gelu", True, False),  # tiny: one row, N and K below one block
]


@pytest.mark.parametrize("shape,n,use_ln,activation,has_bias,has_res", LINEAR_CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_linear(shape, n, use_ln, activation, has_bias, has_res, dtype, device):
    eps = 1e-12
    t = _make(shape, n, dtype, device)
    bias = t["bias"] if has_bias else None
    residual = t["residual"] if has_res else None
    ln = ln_ref = None
    if use_ln:
        mean, rstd = layer_norm_stats(t["x"], eps)
        ln = (mean, rstd, t["ln_w"], t["ln_b"])
        ref_mean, ref_rstd = reference_layer_norm_stats(t["x"].double(), eps)
        ln_ref = (ref_mean, ref_rstd, t["ln_w"].double(), t["ln_b"].double())
    out = fused_linear(t["x"], t["weight"], bias, ln=ln, activation=activation, residual=residual)
    assert out.shape == (*shape[:-1], n) and out.dtype == dtype
    ln_pair = (t["ln_w"], t["ln_b"]) if use_ln else None
    torch_out = _eager(t["x"], t["weight"], bias, ln_pair, activation, residual, eps)

    def up(v):
        return v.double() if v is not None else None

    ref = reference(up(t["x"]), up(t["weight"]), up(bias), ln=ln_ref, activation=activation, residual=up(residual))
    assert_close_to_reference(out, torch_out, ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_non_contiguous_inputs(dtype, device):
    # x and weight as transposed views: the kernel reads them through strides, weight K-major here.
    x = torch.randn(48, 37).to(device=device, dtype=dtype).t()
    weight = (torch.randn(48, 80) * 0.15).to(device=device, dtype=dtype).t()
    out = fused_linear(x, weight, activation="gelu")
    ref = reference(x.double(), weight.double(), activation="gelu")
    assert_close_to_reference(out, _eager(x, weight, activation="gelu"), ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_attention_qkv_projection(dtype, device):
    # LN-before + one GEMM on the concatenated q/k/v weights (3D, D): the first launch of a ViT layer.
    b, tokens, d, eps = 2, 37, 48, 1e-12
    t = _make((b, tokens, d), 3 * d, dtype, device, seed=1)
    mean, rstd = layer_norm_stats(t["x"], eps)
    qkv = fused_linear(t["x"], t["weight"], t["bias"], ln=(mean, rstd, t["ln_w"], t["ln_b"]))
    assert qkv.shape == (b, tokens, 3 * d)
    normed = F.layer_norm(t["x"], (d,), t["ln_w"], t["ln_b"], eps)
    torch_qkv = torch.cat([F.linear(normed, w, bb) for w, bb in zip(t["weight"].chunk(3), t["bias"].chunk(3))], -1)
    ref_normed = F.layer_norm(t["x"].double(), (d,), t["ln_w"].double(), t["ln_b"].double(), eps)
    ref = F.linear(ref_normed, t["weight"].double(), t["bias"].double())
    for part, torch_part, ref_part, what in zip(qkv.chunk(3, -1), torch_qkv.chunk(3, -1), ref.chunk(3, -1), "qkv"):
        assert_close_to_reference(part, torch_part, ref_part, dtype, what=what)


@pytest.mark.parametrize("dtype", DTYPES)
def test_attention_output_projection(dtype, device):
    # attention.output.dense with the residual add fused: h = x + ctx @ W_oᵀ + b_o.
    t = _make((2, 37, 48), 48, dtype, device, seed=2)
    context, x = t["x"], t["residual"]
    h = fused_linear(context, t["weight"], t["bias"], residual=x)
    torch_h = x + F.linear(context, t["weight"], t["bias"])
    ref = x.double() + F.linear(context.double(), t["weight"].double(), t["bias"].double())
    assert_close_to_reference(h, torch_h, ref, dtype)


def test_empty_rows(device):
    x = torch.empty(0, 48, device=device)
    assert fused_linear(x, torch.randn(80, 48, device=device)).shape == (0, 80)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gradients_flow_through_stats_and_linear(dtype, device):
    # Backward re-runs the float32 reference under autograd; grads reach x through mean and rstd too.
    eps = 1e-5
    t = _make((2, 37, 48), 80, dtype, device, seed=3)
    names = ["x", "weight", "bias", "ln_w", "ln_b", "residual"]

    def run(fn, tensors):
        x, w, b, g, beta, r = tensors
        if fn == "kernel":
            mean, rstd = layer_norm_stats(x, eps)
            return fused_linear(x, w, b, ln=(mean, rstd, g, beta), activation="gelu", residual=r)
        return _eager(x, w, b, (g, beta), "gelu", r, eps)

    grad_out = torch.randn(2, 37, 80, generator=torch.Generator().manual_seed(4)).to(device=device, dtype=dtype)
    grads = {}
    for fn, cast in (("kernel", dtype), ("torch", dtype), ("ref", torch.float64)):
        leaves = [t[n].detach().to(cast).requires_grad_(True) for n in names]
        run("kernel" if fn == "kernel" else "torch", leaves).backward(grad_out.to(cast))
        grads[fn] = [leaf.grad for leaf in leaves]
    for name, g_kernel, g_torch, g_ref in zip(names, grads["kernel"], grads["torch"], grads["ref"]):
        assert g_kernel.dtype == dtype
        assert_close_to_reference(g_kernel, g_torch, g_ref, dtype, what=f"grad {name}")


def test_bad_inputs_raise_clear_errors(device):
    x = torch.randn(37, 48, device=device)
    w = torch.randn(80, 48, device=device)
    mean, rstd = layer_norm_stats(x, 1e-5)
    with pytest.raises(ValueError, match="K=48"):
        fused_linear(x, torch.randn(80, 47, device=device))
    with pytest.raises(ValueError, match="ln_w must be"):
        fused_linear(x, w, ln=(mean, rstd, torch.ones(47, device=device), torch.zeros(48, device=device)))
    with pytest.raises(ValueError, match="mean must be float32"):
        fused_linear(x, w, ln=(mean[:5], rstd, torch.ones(48, device=device), torch.zeros(48, device=device)))
    with pytest.raises(TypeError, match="not supported"):
        fused_linear(x.to(torch.int32), w)
    with pytest.raises(TypeError, match=r"weight is torch\.float16"):
        fused_linear(x, w.half())
    with pytest.raises(ValueError, match="residual must be"):
        fused_linear(x, w, residual=torch.randn(37, 79, device=device))
    with pytest.raises(ValueError, match="bias must be"):
        fused_linear(x, w, torch.randn(79, device=device))
    with pytest.raises(ValueError, match="activation"):
        fused_linear(x, w, activation="relu")
    with pytest.raises(TypeError, match="not supported"):
        layer_norm_stats(x.to(torch.int64), 1e-5)


# Issue 14 item 1: every tile the GPU autotuner can choose, forced one at a time under the interpreter,
# on shapes with a single partial block (M=1), exact blocks (M=64, K=128) and 1-row/column tails
# (M=65, N=65), K not a multiple of BLOCK_K (48, 80), and the ViT row count 577 — with the LN
# prologue, GELU and residual epilogue all on, so each masked path runs.
def _forced_cases():

    for cfg in fl_tiles.GPU_CONFIGS:
        tile = (*(cfg.kwargs[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K")), cfg.num_warps, cfg.num_stages)
        dtype = torch.float32 if tile in fl_tiles.FP32_TILES else torch.float16
        yield pytest.param(cfg, dtype, id="x".join(map(str, tile[:3])) + f"-w{tile[3]}-s{tile[4]}")


@pytest.mark.parametrize(("config", "dtype"), list(_forced_cases()))
def test_every_gpu_config_forced(config, dtype, device):
    from vithybrid_fast.kernels import fused_linear as fl
    from vithybrid_fast.kernels._tuning import force_config

    with force_config("fused_linear", config):
        for m, k, n in [(1, 48, 65), (64, 128, 64), (65, 80, 63), (577, 96, 130)]:
            t = _make((m, k), n, dtype, device, seed=m)
            mean, rstd = layer_norm_stats(t["x"], 1e-5)
            ln = (mean, rstd, t["ln_w"], t["ln_b"])
            out = fused_linear(t["x"], t["weight"], t["bias"], ln=ln, activation="gelu", residual=t["residual"])
            assert fl._fused_linear_tuned.autotuner.best_config is config  # the forced tile ran
            args = dict(ln=ln, activation="gelu", residual=t["residual"])
            ref = reference(t["x"].double(), t["weight"].double(), t["bias"].double(), **{
                **args, "ln": tuple(v.double() for v in ln), "residual": t["residual"].double()})  # fmt: skip
            torch_out = _eager(t["x"], t["weight"], t["bias"], ln=(t["ln_w"], t["ln_b"]), activation="gelu",
                               residual=t["residual"])  # fmt: skip
            assert_close_to_reference(out, torch_out, ref, dtype, what=f"M={m} K={k} N={n}")


# Issue 14 item 7: the prune runs only on a GPU, so it is unit-tested here with A100/H100 figures.
A100, H100 = (108, 166_912), (132, 232_448)


@pytest.mark.parametrize("gpu", [A100, H100], ids=["A100", "H100"])
@pytest.mark.parametrize("batch", [1, 2, 4, 8, 16, 32, 64, 128])
@pytest.mark.parametrize(("n", "k"), [(2304, 768), (768, 768), (3072, 768), (768, 3072)])
@pytest.mark.parametrize("elem_bytes", [2, 4], ids=["16bit", "fp32"])
def test_prune_keeps_two_fitting_tiles_of_the_dtype(gpu, batch, n, k, elem_bytes):

    sm_count, smem = gpu
    m = 577 * batch
    kept = fl_tiles.select_configs(fl_tiles.GPU_CONFIGS, m, n, elem_bytes, sm_count, smem)
    family = fl_tiles.FP32_TILES if elem_bytes == 4 else fl_tiles.HALF_TILES
    tiles = [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps, c.num_stages) for c in kept]
    assert 1 <= len(kept) <= 2 and all(t in family for t in tiles)
    assert all((bm + bn) * bk * elem_bytes * stages <= smem for bm, bn, bk, _, stages in tiles)
    if elem_bytes == 2 and batch >= 8:
        # 577·8 rows and up fill every SM with 128×128 tiles: the biggest tile is a candidate.
        assert (128, 128) in [t[:2] for t in tiles]


@pytest.mark.parametrize("gpu", [A100, H100], ids=["A100", "H100"])
def test_prune_at_batch_one_prefers_more_tiles(gpu):
    # 577 × 768 at batch 1: even 64×64 gives only 10·12 = 120 tiles (< 132 SMs on an H100): the tile
    # with the most programs comes first.

    kept = fl_tiles.select_configs(fl_tiles.GPU_CONFIGS, 577, 768, 2, *gpu)
    assert [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) for c in kept] == [(64, 64), (128, 128)]


def test_prune_function_reads_the_tensor_dtype():
    # The autotuner's hook: named args as Triton passes them; no GPU here, so A100 figures are assumed.

    for dtype, family in [(torch.float32, fl_tiles.FP32_TILES), (torch.bfloat16, fl_tiles.HALF_TILES)]:
        named_args = {"x_ptr": torch.empty(0, dtype=dtype), "M": 577 * 64, "N": 3072}
        kept = fl_tiles.prune_configs(fl_tiles.GPU_CONFIGS, named_args)
        assert kept and all((c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps,
                             c.num_stages) in family for c in kept)  # fmt: skip
