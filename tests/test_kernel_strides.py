"""Every kernel argument in its own memory layout (issue 14, blind spot 3).

The other kernel tests give q, k and v one shared stride pattern and keep residuals contiguous, so a
launcher that hands the kernel one tensor's strides for another, or a kernel that indexes one tensor
with another's strides, would still pass there. Here each argument gets a *different* layout —
packed-QKV views, batch/head-permuted buffers, slices of wider or longer buffers, transposed
(column-major) matrices, channels-last maps — and every result is checked against the float64
reference with the tolerance idiom of tests/tolerance.py. Shapes are small: kernels run in the Triton
interpreter on a CPU.
"""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F
from vithybrid_fast.kernels.add_layer_norm import add_layer_norm
from vithybrid_fast.kernels.add_layer_norm import reference as add_ln_reference
from vithybrid_fast.kernels.attention import flash_attention
from vithybrid_fast.kernels.attention import reference as attention_reference
from vithybrid_fast.kernels.fused_linear import fused_linear, layer_norm_stats, reference_layer_norm_stats
from vithybrid_fast.kernels.fused_linear import reference as linear_reference
from vithybrid_fast.kernels.group_norm_act import group_norm_act
from vithybrid_fast.kernels.group_norm_act import reference as gn_reference
from vithybrid_fast.kernels.layer_norm_mlp import layer_norm_mlp
from vithybrid_fast.kernels.layer_norm_mlp import reference as mlp_reference
from vithybrid_fast.kernels.weight_standardize import reference as ws_reference
from vithybrid_fast.kernels.weight_standardize import weight_standardize

from tests.tolerance import assert_close_to_reference

gn_module = sys.modules["vithybrid_fast.kernels.group_norm_act"]

# Under the interpreter numpy warns about inf/NaN in the padded key rows the attention backward
# computes and discards by design (see tests/test_kernel_attention.py).
pytestmark = [
    pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
]


def _randn(shape, seed: int, scale: float = 1.0, shift: float = 0.0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale + shift


def _distinct_strides(*tensors: torch.Tensor) -> None:
    """The layouts must really differ, or the test proves nothing about mixing strides up."""
    strides = [t.stride() for t in tensors]
    assert len(set(strides)) == len(strides), strides


# ---------------------------------------------------------------------------------------------
# flash_attention: q, k, v each in another layout
# ---------------------------------------------------------------------------------------------
B, H, N, D = 2, 3, 50, 32  # N=50: one full 32-key block and a partial tail under the interpreter


def _attention_view(layout: str, dtype: torch.dtype, device: str, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(leaf buffer, its (B, H, N, D) view in `layout`): gradients are taken w.r.t. the buffer."""
    if layout == "packed-qkv":  # the encoder's layout: slot 1 of a (B, N, 3, H, D) projection
        buf = _randn((B, N, 3, H, D), seed).to(device, dtype).requires_grad_()
        return buf, buf[:, :, 1].transpose(1, 2)
    if layout == "head-major":  # (H, B, N, D) storage: batch and head strides swapped in size
        buf = _randn((H, B, N, D), seed).to(device, dtype).requires_grad_()
        return buf, buf.permute(1, 0, 2, 3)
    if layout == "sliced":  # rows 3..3+N of a longer sequence, the upper half of a 2·D-wide head
        buf = _randn((B, H, N + 7, 2 * D), seed).to(device, dtype).requires_grad_()
        return buf, buf[:, :, 3 : 3 + N, D:]
    if layout == "d-major":  # (B, H, D, N) storage: last-dim stride N (the launcher copies this one)
        buf = _randn((B, H, D, N), seed).to(device, dtype).requires_grad_()
        return buf, buf.transpose(-1, -2)
    raise ValueError(layout)


ATTENTION_LAYOUTS = [
    ("packed-qkv", "head-major", "sliced"),
    ("sliced", "packed-qkv", "head-major"),
    ("head-major", "sliced", "packed-qkv"),
    ("packed-qkv", "sliced", "d-major"),  # v copied by the launcher, q/k read in place
]


@pytest.mark.parametrize("layouts", ATTENTION_LAYOUTS, ids="/".join)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_flash_attention_distinct_layouts(layouts, dtype, device):
    bufs, views = zip(*(_attention_view(lay, dtype, device, seed) for seed, lay in enumerate(layouts)))
    _distinct_strides(*views)
    out = flash_attention(*views)
    eager = torch.softmax(views[0] @ views[1].transpose(-2, -1) * D**-0.5, dim=-1) @ views[2]
    ref_bufs = [b.detach().double().requires_grad_() for b in bufs]
    # the same views (offset, sizes, strides) of float64 copies of the contiguous buffers
    ref = attention_reference(
        *(rb.as_strided(v.shape, v.stride(), v.storage_offset()) for rb, v in zip(ref_bufs, views))
    )
    assert_close_to_reference(out, eager, ref, dtype, what="output")

    # the incoming gradient is strided too: the model reads the output back as (B, N, H·D)
    grad = _randn((B, N, H * D), 99).to(device, dtype).view(B, N, H, D).transpose(1, 2)
    grads = torch.autograd.grad(out, bufs, grad)
    eager_grads = torch.autograd.grad(eager, bufs, grad)
    ref_grads = torch.autograd.grad(ref, ref_bufs, grad.double())
    for name, g, eg, rg in zip("qkv", grads, eager_grads, ref_grads):
        assert_close_to_reference(g, eg, rg, dtype, what=f"d{name} ({layouts['qkv'.index(name)]})")


# ---------------------------------------------------------------------------------------------
# layer_norm_stats + fused_linear: x, weight and residual each in another layout
# ---------------------------------------------------------------------------------------------
M, K, NOUT = 37, 48, 40  # odd M, K and N: partial tiles everywhere


def _matrix(layout: str, rows: int, cols: int, seed: int, dtype, device, **randn) -> torch.Tensor:
    """A (rows, cols) matrix whose memory is laid out as `layout`."""
    if layout == "contiguous":
        return _randn((rows, cols), seed, **randn).to(device, dtype)
    if layout == "column-major":  # a transposed contiguous (cols, rows) buffer: strides (1, rows)
        return _randn((cols, rows), seed, **randn).to(device, dtype).t()
    if layout == "col-sliced":  # columns 2..2+cols of a wider buffer: row stride cols + 5
        return _randn((rows, cols + 5), seed, **randn).to(device, dtype)[:, 2 : 2 + cols]
    if layout == "row-strided":  # every other row of a taller buffer: row stride 2·cols
        return _randn((2 * rows, cols), seed, **randn).to(device, dtype)[::2]
    raise ValueError(layout)


LINEAR_LAYOUTS = [  # (x, weight, residual)
    ("column-major", "col-sliced", "row-strided"),
    ("col-sliced", "column-major", "contiguous"),
    ("row-strided", "contiguous", "column-major"),
    ("contiguous", "row-strided", "col-sliced"),
]


def _strided_vector(n: int, seed: int, dtype, device, **randn) -> torch.Tensor:
    return _randn((2 * n,), seed, **randn).to(device, dtype)[1::2]  # stride 2, offset 1


@pytest.mark.parametrize("layouts", LINEAR_LAYOUTS, ids="/".join)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fused_linear_distinct_layouts(layouts, dtype, device):
    x_layout, w_layout, r_layout = layouts
    x = _matrix(x_layout, M, K, 0, dtype, device, shift=0.5)
    weight = _matrix(w_layout, NOUT, K, 1, dtype, device, scale=K**-0.5)
    residual = _matrix(r_layout, M, NOUT, 2, dtype, device)
    _distinct_strides(x, weight, residual)
    bias = _strided_vector(NOUT, 3, dtype, device, scale=0.1)
    ln_w = _strided_vector(K, 4, dtype, device, scale=0.2, shift=1.0)
    ln_b = _strided_vector(K, 5, dtype, device, scale=0.1)
    eps = 1e-5

    mean, rstd = layer_norm_stats(x, eps)
    ref_mean, ref_rstd = reference_layer_norm_stats(x.double(), eps)
    torch_mean, torch_rstd = reference_layer_norm_stats(x, eps)  # float32 plain torch
    assert_close_to_reference(mean, torch_mean, ref_mean, torch.float32, what="mean")
    assert_close_to_reference(rstd, torch_rstd, ref_rstd, torch.float32, what="rstd")

    out = fused_linear(x, weight, bias, ln=(mean, rstd, ln_w, ln_b), activation="gelu", residual=residual)
    eager = F.gelu(F.linear(F.layer_norm(x, (K,), ln_w, ln_b, eps), weight, bias)) + residual
    as64 = [t.double() for t in (x, weight, bias, ln_w, ln_b, residual)]
    ref = linear_reference(
        as64[0], as64[1], as64[2], ln=(ref_mean, ref_rstd, as64[3], as64[4]), activation="gelu", residual=as64[5]
    )
    assert_close_to_reference(out, eager, ref, dtype, what="fused_linear")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_fused_linear_3d_views(dtype, device):
    # (B, T, K) x as tokens 1..T of a longer sequence (not flattenable to 2-D without a copy) and a
    # (B, T, N) residual seen through (B, N, T) storage, as a transposed conv feature map would be.
    bsz, tokens = 2, 19
    x = _randn((bsz, tokens + 3, K), 0, shift=0.3).to(device, dtype)[:, 1 : 1 + tokens]
    residual = _randn((bsz, NOUT, tokens), 1).to(device, dtype).transpose(1, 2)
    weight = _randn((NOUT, K), 2, scale=K**-0.5).to(device, dtype)
    _distinct_strides(x, residual)
    out = fused_linear(x, weight, None, residual=residual)
    eager = F.linear(x, weight) + residual
    ref = linear_reference(x.double(), weight.double(), None, residual=residual.double())
    assert out.shape == (bsz, tokens, NOUT)
    assert_close_to_reference(out, eager, ref, dtype, what="fused_linear 3-D")


# ---------------------------------------------------------------------------------------------
# layer_norm_mlp: x, fc1 and fc2 weights each in another layout
# ---------------------------------------------------------------------------------------------
MLP_LAYOUTS = [  # (x, fc1_w, fc2_w)
    ("col-sliced", "column-major", "row-strided"),
    ("column-major", "row-strided", "col-sliced"),
]


@pytest.mark.parametrize("layouts", MLP_LAYOUTS, ids="/".join)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_layer_norm_mlp_distinct_layouts(layouts, dtype, device):
    hidden, eps = 80, 1e-6
    x_layout, fc1_layout, fc2_layout = layouts
    x = _matrix(x_layout, M, K, 0, dtype, device, shift=0.5)  # also the residual, read in its own layout
    fc1_w = _matrix(fc1_layout, hidden, K, 1, dtype, device, scale=K**-0.5)
    fc2_w = _matrix(fc2_layout, K, hidden, 2, dtype, device, scale=hidden**-0.5)
    _distinct_strides(x, fc1_w, fc2_w)
    ln_w = _strided_vector(K, 3, dtype, device, scale=0.2, shift=1.0)
    ln_b = _strided_vector(K, 4, dtype, device, scale=0.1)
    fc1_b = _strided_vector(hidden, 5, dtype, device, scale=0.1)
    fc2_b = _strided_vector(K, 6, dtype, device, scale=0.1)
    params = (ln_w, ln_b, fc1_w, fc1_b, fc2_w, fc2_b)
    with torch.no_grad():
        out = layer_norm_mlp(x, *params, eps)
    h = F.gelu(F.linear(F.layer_norm(x, (K,), ln_w, ln_b, eps), fc1_w, fc1_b))
    eager = F.linear(h, fc2_w, fc2_b) + x
    ref = mlp_reference(x.double(), *(p.double() for p in params), eps)
    assert_close_to_reference(out, eager, ref, dtype, what="layer_norm_mlp")


# ---------------------------------------------------------------------------------------------
# group_norm_act: x and residual in different layouts, both forward paths
# ---------------------------------------------------------------------------------------------
@pytest.fixture(params=["single", "split"])
def gn_path(request, monkeypatch) -> str:
    monkeypatch.setattr(gn_module, "_FORCE_PATH", request.param)
    return request.param


def _feature_map(layout: str, seed: int, dtype, device, shape=(2, 12, 5, 7), **randn) -> torch.Tensor:
    n, c, h, w = shape
    if layout == "nchw":
        return _randn(shape, seed, **randn).to(device, dtype)
    if layout == "channels-last":
        return _randn(shape, seed, **randn).to(device, dtype).contiguous(memory_format=torch.channels_last)
    if layout == "w-sliced":  # columns 1..1+w of a wider map: neither NCHW- nor channels-last-dense
        return _randn((n, c, h, w + 3), seed, **randn).to(device, dtype)[..., 1 : 1 + w]
    if layout == "batch-inner":  # (C, N, H, W) storage seen as (N, C, H, W): not dense in either layout
        return _randn((c, n, h, w), seed, **randn).to(device, dtype).transpose(0, 1)
    raise ValueError(layout)


GN_LAYOUTS = [  # (x, residual)
    ("nchw", "channels-last"),
    ("channels-last", "nchw"),
    ("w-sliced", "channels-last"),
    ("channels-last", "w-sliced"),
    ("batch-inner", "nchw"),
    ("nchw", "batch-inner"),
]


@pytest.mark.parametrize("layouts", GN_LAYOUTS, ids="/".join)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_group_norm_act_distinct_layouts(layouts, dtype, device, gn_path):
    x = _feature_map(layouts[0], 0, dtype, device, scale=2.0, shift=0.5).requires_grad_()
    residual = _feature_map(layouts[1], 1, dtype, device).requires_grad_()
    _distinct_strides(x, residual)
    weight = (_randn((12,), 2, scale=0.3, shift=1.0)).to(device, dtype)
    bias = (_randn((12,), 3, scale=0.2)).to(device, dtype)
    out = group_norm_act(x, 4, weight, bias, 1e-5, "relu", residual)
    eager = torch.relu(F.group_norm(x, 4, weight, bias, 1e-5) + residual)
    x64, r64 = x.detach().double().requires_grad_(), residual.detach().double().requires_grad_()
    ref = gn_reference(x64, 4, weight.double(), bias.double(), 1e-5, "relu", r64)
    assert_close_to_reference(out, eager, ref, dtype, what="forward")

    grad = _feature_map("w-sliced", 4, dtype, device)  # a strided incoming gradient as well
    gx, gr = torch.autograd.grad(out, (x, residual), grad)
    egx, egr = torch.autograd.grad(eager, (x, residual), grad)
    rgx, rgr = torch.autograd.grad(ref, (x64, r64), grad.double())
    assert_close_to_reference(gx, egx, rgx, dtype, what="dx")
    assert_close_to_reference(gr, egr, rgr, dtype, what="d residual")


def test_group_norm_act_3d_channels_last_x_with_nchw_residual(device, gn_path):
    # (N, C, L) seen through (N, L, C) storage, residual (N, C, L) contiguous, no activation
    x = _randn((2, 9, 8), 0, scale=2.0, shift=-1.0).to(device).transpose(1, 2)
    residual = _randn((2, 8, 9), 1).to(device)
    out = group_norm_act(x, 2, None, None, 1e-5, None, residual)
    eager = F.group_norm(x, 2, None, None, 1e-5) + residual
    ref = gn_reference(x.double(), 2, None, None, 1e-5, None, residual.double())
    assert_close_to_reference(out, eager, ref, torch.float32)


# ---------------------------------------------------------------------------------------------
# weight_standardize: layouts read in place and layouts copied, on both kernel paths
# ---------------------------------------------------------------------------------------------
def _conv_weight(layout: str, shape: tuple[int, ...], seed: int, device) -> torch.Tensor:
    if layout == "contiguous":
        return _randn(shape, seed, scale=0.1, shift=0.02).to(device)
    if layout == "channels-last":  # OHWI memory: each output channel still one span of K elements
        return _randn(shape, seed, scale=0.1, shift=0.02).to(device).contiguous(memory_format=torch.channels_last)
    if layout == "io-transposed":  # an (I, O, kh, kw) buffer seen as (O, I, kh, kw): channels interleaved
        o, i, kh, kw = shape
        return _randn((i, o, kh, kw), seed, scale=0.1, shift=0.02).to(device).transpose(0, 1)
    if layout == "out-sliced":  # every other output channel of a bigger conv
        o, *rest = shape
        return _randn((2 * o, *rest), seed, scale=0.1, shift=0.02).to(device)[::2]
    raise ValueError(layout)


@pytest.mark.parametrize("layout", ["channels-last", "io-transposed", "out-sliced"])
@pytest.mark.parametrize(
    "shape",
    [
        (6, 5, 3, 3),  # K = 45: the whole row in registers
        (3, 520, 3, 3),  # K = 4680 > 4096: the looped three-sweep path
    ],
    ids=["single-pass", "looped"],
)
def test_weight_standardize_layouts(layout, shape, device):
    w = _conv_weight(layout, shape, 0, device).requires_grad_()
    assert not w.is_contiguous()
    out = weight_standardize(w, 1e-8)
    assert out.shape == w.shape
    w64 = w.detach().double().requires_grad_()
    ref = ws_reference(w64, 1e-8)
    torch_out = ws_reference(w, 1e-8)  # plain torch in float32
    assert_close_to_reference(out, torch_out, ref, torch.float32, what="forward")

    grad = _conv_weight("io-transposed", shape, 1, device)  # strided gradient in yet another layout
    (gw,) = torch.autograd.grad(out, w, grad)
    (tgw,) = torch.autograd.grad(torch_out, w, grad)
    (rgw,) = torch.autograd.grad(ref, w64, grad.double())
    assert_close_to_reference(gw, tgw, rgw, torch.float32, what="grad")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_add_layer_norm_distinct_layouts(dtype, device):
    # x: rows of a wider buffer (row stride 160 > 96); residual: (B, N, D) with its leading dims swapped;
    # a third call with x's columns at stride 2, which the launcher copies to contiguous rows first
    g = torch.Generator().manual_seed(7)
    x = torch.randn(4, 2, 96, generator=g).to(dtype).to(device)
    r = torch.randn(4, 2, 96, generator=g).to(dtype).to(device)
    w = (1 + 0.1 * torch.randn(96, generator=g)).to(dtype).to(device)
    b = (0.1 * torch.randn(96, generator=g)).to(dtype).to(device)
    wide = torch.zeros(4, 2, 160, dtype=dtype, device=device)
    wide[..., 32:128] = x
    swapped = r.transpose(0, 1).contiguous().transpose(0, 1)  # same values, leading strides swapped
    spaced = torch.zeros(4, 2, 192, dtype=dtype, device=device)
    spaced[..., ::2] = x
    torch_h, torch_y = add_ln_reference(x, r, w, b, 1e-5)
    _, want = add_ln_reference(x.double(), r.double(), w.double(), b.double(), 1e-5)
    w_spaced = torch.zeros(192, dtype=dtype, device=device)
    w_spaced[::2] = w  # LayerNorm weight and bias as strided views too (a kernel indexing them as rows fails)
    b_wide = torch.zeros(160, dtype=dtype, device=device)
    b_wide[32:128] = b
    for xs, rs, ws, bs in ((wide[..., 32:128], swapped, w, b), (spaced[..., ::2], r, w_spaced[::2], b),
                           (x, swapped, w_spaced[::2], b_wide[32:128])):  # fmt: skip
        h, y = add_layer_norm(xs, rs, ws, bs, 1e-5)
        assert h.is_contiguous() and y.is_contiguous()
        assert_close_to_reference(h, torch_h, (x.double() + r.double()), dtype, what="h")
        assert_close_to_reference(y, torch_y, want, dtype, what="LayerNorm(h)")
