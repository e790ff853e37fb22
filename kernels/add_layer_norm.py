"""Residual add + LayerNorm in one pass: `h = x + residual; y = LN(h)`, both written (inference glue).

Why: `kernels="auto"` keeps cuBLAS for the encoder's GEMMs (our fused GEMMs lose to it), and then the
glue between them decides the rest. On the H100 (bf16, batch 64; bench/results/nvidia-h100-2026-11-26-notes.md)
torch's residual adds took 1.48 ms and its LayerNorms 2.02 ms per forward, while torch.compile's
fused add + LayerNorm kernels took 1.99 ms for both. This kernel is that fusion: one read of x and the
residual, one write of h and of y. Without a residual it is a plain LayerNorm (one read, one write).
`vithybrid_fast.fast.FastViTLayer` offers it to the measured dispatch where the GEMMs went to torch;
the dispatch keeps whichever of it and torch's ops runs faster.

Numerics, as torch computes the unfused pair: h is rounded to x.dtype (torch's add) and the statistics
are taken from that rounded h in float32: mean, then the centred sum of squares corrected by the
residual sum of the centred values (exact for constant rows, never E[h²] − E[h]²); y = (h − mean)·rstd·γ
+ β in float32, rounded once to x.dtype. Shapes: x and residual (…, N) with the same shape and dtype,
weight and bias (N,), any stride; N ≤ 8192 (a row is one block). Dtypes: float32, float16, bfloat16.

Inference only: with autograd recording a gradient for any input the call runs `reference` instead
(differentiable, same values up to rounding). One compile per (dtype, residual or not, N's block).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._runtime import check_launchable, needs_registered_op
from ._tuning import jit

MAX_WIDTH = 8192  # one row per program, held whole in registers


def reference(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-torch twin, what the unfused model computes: (x + residual, layer_norm(x + residual))."""
    h = x if residual is None else x + residual
    return h, torch.nn.functional.layer_norm(h, (h.shape[-1],), weight, bias, eps)


@jit
def _add_layer_norm_kernel(
    x_ptr,  # (M, N) rows
    res_ptr,  # (M, N) residual rows (unused without HAS_RESIDUAL)
    w_ptr,  # (N,) LayerNorm weight
    b_ptr,  # (N,) LayerNorm bias
    h_ptr,  # (M, N) out: x + residual in h's dtype (unused without HAS_RESIDUAL)
    y_ptr,  # (M, N) out: LayerNorm(h) in y's dtype
    mean_ptr,  # (M,) float32 out: each row's mean (unused without SAVE_STATS)
    rstd_ptr,  # (M,) float32 out: each row's 1 / sqrt(var + eps) (unused without SAVE_STATS)
    N,  # row length
    stride_x,  # row strides (elements; columns are contiguous)
    stride_r,
    stride_h,
    stride_y,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    SAVE_STATS: tl.constexpr,  # for the backward (add_layer_norm_train.py)
    BLOCK_N: tl.constexpr,  # next power of two ≥ N
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    h = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * stride_r + cols, mask=mask, other=0.0)
        # torch's add: float32 math, one rounding to h's dtype (x's, or the wider of x's and the residual's
        # under autocast: a bf16 branch added to the float32 residual stream)
        h = (h.to(tl.float32) + r.to(tl.float32)).to(h_ptr.dtype.element_ty)
        tl.store(h_ptr + row * stride_h + cols, h, mask=mask)
    hf = h.to(tl.float32)
    n = N * 1.0
    mean = tl.sum(hf, axis=0) / n
    centred = tl.where(mask, hf - mean, 0.0)
    # the rounded float32 mean leaves a residual sum in the centred values; without this correction the
    # variance is inflated by its square / n, which decides rstd for rows whose variance is near eps
    resid = tl.sum(centred, axis=0)
    var = (tl.sum(centred * centred, axis=0) - resid * resid / n) / n
    centred = centred - resid / n
    rstd = 1.0 / tl.sqrt(tl.maximum(var, 0.0) + eps)
    if SAVE_STATS:  # the mean the centred values imply (corrected by their residual sum)
        tl.store(mean_ptr + row, mean + resid / n)
        tl.store(rstd_ptr + row, rstd)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    y = centred * rstd * w + b
    tl.store(y_ptr + row * stride_y + cols, y.to(y_ptr.dtype.element_ty), mask=mask)


def _warps(block_n: int) -> int:
    """4 warps up to a 2048-wide row (ViT-Base's 768 → 1024), 8 beyond: ~8 elements per thread or fewer."""
    return 4 if block_n <= 2048 else 8


def _rows(t: torch.Tensor) -> torch.Tensor:
    flat = t.reshape(-1, t.shape[-1])
    return flat if flat.stride(-1) == 1 else flat.contiguous()


def launch(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch only (no checks, no autograd): (h, y), contiguous; h is x itself without a residual."""
    n = x.shape[-1]
    x2 = _rows(x)
    r2 = _rows(residual) if residual is not None else x2
    weight, bias = weight.contiguous(), bias.contiguous()  # the kernel reads them at unit stride (no-ops for params)
    y = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    h = torch.empty_like(y) if residual is not None else x
    y2 = y.view(-1, n)
    h2 = h.view(-1, n) if residual is not None else y2
    m = x2.shape[0]
    if m > 0:
        block_n = triton.next_power_of_2(n)
        _add_layer_norm_kernel[(m,)](
            x2, r2, weight, bias, h2, y2, y2, y2, n, x2.stride(0), r2.stride(0), h2.stride(0), y2.stride(0), eps,
            HAS_RESIDUAL=residual is not None, SAVE_STATS=False, BLOCK_N=block_n, num_warps=_warps(block_n),
        )  # fmt: skip
    return h, y


# Custom ops (as the other kernels): torch.compile sees one opaque node. Forward only: the public
# function runs `reference` whenever a gradient is recorded. Without a residual the op returns y alone
# (h is x itself, and an op's output may not alias its input).
@torch.library.custom_op("vithybrid::add_layer_norm", mutates_args=())
def _add_layer_norm_op(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    return launch(x, residual, weight, bias, eps)


@_add_layer_norm_op.register_fake
def _(x, residual, weight, bias, eps):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device), torch.empty(x.shape, dtype=x.dtype, device=x.device)


@torch.library.custom_op("vithybrid::layer_norm", mutates_args=())
def _layer_norm_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    return launch(x, None, weight, bias, eps)[1]


@_layer_norm_op.register_fake
def _(x, weight, bias, eps):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


def check_inputs(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor,
    name: str = "add_layer_norm",
    same_dtype: bool = True,
) -> None:
    """Clear errors for what the kernel cannot take; `same_dtype` False lets the residual's dtype differ
    (add_layer_norm_train: autocast's bf16 branch on the float32 stream)."""
    tensors = (x, weight, bias) if residual is None else (x, residual, weight, bias)
    check_launchable(name, *tensors)
    n = x.shape[-1] if x.dim() else 0
    if n == 0 or n > MAX_WIDTH:
        raise ValueError(f"{name}: rows of 1 to {MAX_WIDTH} elements, got shape {tuple(x.shape)}")
    if residual is not None and (residual.shape != x.shape or (same_dtype and residual.dtype != x.dtype)):
        raise ValueError(
            f"{name}: residual {tuple(residual.shape)} {residual.dtype} must match x {tuple(x.shape)} {x.dtype}"
        )
    if weight.shape != (n,) or bias.shape != (n,):
        raise ValueError(f"{name}: weight and bias must be ({n},), got {tuple(weight.shape)} and {tuple(bias.shape)}")


def add_layer_norm(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(h, LayerNorm(h)) with h = x + residual (or x when residual is None), in x.dtype, contiguous.

    Inference glue: where a gradient is recorded for any input it returns `reference(...)` instead.
    """
    check_inputs(x, residual, weight, bias)
    tensors = [t for t in (x, residual, weight, bias) if t is not None]
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return reference(x, residual, weight, bias, eps)
    if not needs_registered_op(*tensors):
        return launch(x, residual, weight, bias, float(eps))
    if residual is None:
        return x, _layer_norm_op(x, weight, bias, float(eps))
    return _add_layer_norm_op(x, residual, weight, bias, float(eps))


def offline_launches(dtype: torch.dtype, batches: list[int], arch: int | None = None) -> list:
    """The encoder's two uses per layer at ViT-Base's width: + residual → LayerNorm-after, LayerNorm-before."""
    from ._offline import HIDDEN, Launch, TensorArg

    t = TensorArg(dtype)
    block_n = triton.next_power_of_2(HIDDEN)
    launches = []
    for has_residual in (True, False):
        args = dict(
            x_ptr=t, res_ptr=t, w_ptr=t, b_ptr=t, h_ptr=t, y_ptr=t, mean_ptr=t, rstd_ptr=t, N=HIDDEN,
            stride_x=HIDDEN, stride_r=HIDDEN, stride_h=HIDDEN, stride_y=HIDDEN, eps=1e-12,
            HAS_RESIDUAL=has_residual, SAVE_STATS=False, BLOCK_N=block_n,
        )  # fmt: skip
        name = "add_layer_norm" if has_residual else "layer_norm"
        launches.append(Launch(name, _add_layer_norm_kernel, args, [triton.Config({}, num_warps=_warps(block_n))]))
    return launches
