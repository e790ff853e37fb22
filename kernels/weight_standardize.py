"""Weight standardization of conv weights: per output channel, (w − mean) / sqrt(biased var + eps).

BiT's `WeightStandardizedConv2d` (HF: `nn.functional.batch_norm(w.reshape(1, O, -1), None, None,
training=True, momentum=0., eps=eps)`) standardizes every conv weight of the backbone before each conv;
eps is 1e-8 for every conv of ViT Hybrid.

Shapes: w (O, *) with O output channels and K = numel / O fan-in elements per channel, e.g. (64, 3, 7, 7)
(K = 147) up to (256, 1024, 1, 1) / (256, 256, 3, 3) (K = 1024 / 2304); any O, K ≥ 1 works.
Dtypes: float32, float16, bfloat16 in; statistics in float32; output in w.dtype.

Layout: each output channel must be one contiguous span of K elements. That holds for contiguous (OIHW)
and channels_last (OHWI) weights, which are read in place, and the output keeps that memory format
(the statistics do not depend on element order). Any other strides are copied to contiguous first.

Kernel: one program per output channel, three sweeps over its row in fixed BLOCK chunks (sum → mean;
centred sum of squares and Σ(w − mean), which corrects the mean's rounding → var; write), the later
sweeps re-reading ≤ 9 KB per row (K = 2304, bf16) from L1/L2: exact (a constant row gives exactly 0),
never E[w²] − E[w]², which cancels when |mean| ≫ std. K is a runtime argument (a constexpr only under
the interpreter) and there is one config (`plan`), so a dtype compiles at most twice (K divisible by 16
or not) for any model; in inference the result is cached per weight: one launch per conv per process.

Backward (Triton): with ŵ = (w − mean)·rstd and g = dL/dout, per channel
    dL/dw = rstd · (g − mean(g) − ŵ · mean(g · ŵ))
using the float32 mean/rstd saved by the forward pass (O floats each).

Entry point: `weight_standardize(w, eps)`, backed by the torch custom ops `vithybrid::weight_standardize`
and `vithybrid::weight_standardize_backward`, so torch.compile traces a model calling it without a graph
break. No double backward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._eager import call, custom_op, run, twin
from ._runtime import check_launchable, interpreter_enabled, needs_registered_op
from ._tuning import jit


def reference(w: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Plain-torch twin: float32 math (float64 for a float64 input), result in w.dtype."""
    compute = torch.promote_types(w.dtype, torch.float32)
    flat = w.to(compute).reshape(w.shape[0], -1)
    mean = flat.mean(dim=1, keepdim=True)
    var = flat.var(dim=1, correction=0, keepdim=True)
    return ((flat - mean) / torch.sqrt(var + eps)).reshape(w.shape).to(w.dtype)


@jit(constexpr_under_interpreter=["K"])
def _weight_standardize_fwd(
    w_ptr,  # (O, K) weight rows, each a contiguous span
    out_ptr,  # (O, K) standardized weight, w.dtype
    mean_ptr,  # (O,) float32 out, saved for backward
    rstd_ptr,  # (O,) float32 out, saved for backward
    eps,  # 1e-8 for BiT
    K,  # fan-in; specialized only by divisibility (aligned rows vectorize), so loops run to it at runtime
    BLOCK: tl.constexpr,  # row chunk per loop step
):
    row = tl.program_id(0).to(tl.int64)
    w_ptr += row * K
    out_ptr += row * K
    cols = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, K, BLOCK):
        mask = start + cols < K
        acc += tl.load(w_ptr + start + cols, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(acc, axis=0) / K
    # Second sweep: exact Σ(w − mean)², never E[w²] − E[w]² (which cancels when |mean| ≫ std), and
    # Σ(w − mean), which corrects the rounding of Σw / K (corrected two-pass; a constant row gives 0).
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    acc_c = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, K, BLOCK):
        mask = start + cols < K
        w = tl.load(w_ptr + start + cols, mask=mask, other=0.0).to(tl.float32)
        centred = tl.where(mask, w - mean, 0.0)
        acc += centred * centred
        acc_c += centred
    corr = tl.sum(acc_c, axis=0)
    var = tl.maximum(tl.sum(acc, axis=0) - corr * corr / K, 0.0) / K
    rstd = 1.0 / tl.sqrt(var + eps)
    mean += corr / K
    for start in range(0, K, BLOCK):
        mask = start + cols < K
        w = tl.load(w_ptr + start + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + start + cols, ((w - mean) * rstd).to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(mean_ptr + row, mean)
    tl.store(rstd_ptr + row, rstd)


@jit(constexpr_under_interpreter=["K"])
def _weight_standardize_bwd(
    g_ptr,  # (O, K) upstream gradient, same layout as w
    w_ptr,  # (O, K) the forward's input
    mean_ptr,  # (O,) float32 from the forward
    rstd_ptr,  # (O,) float32 from the forward
    dw_ptr,  # (O, K) out: gradient w.r.t. w, w.dtype
    K,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    g_ptr += row * K
    w_ptr += row * K
    dw_ptr += row * K
    mean = tl.load(mean_ptr + row)
    rstd = tl.load(rstd_ptr + row)
    cols = tl.arange(0, BLOCK)
    acc_g = tl.zeros([BLOCK], dtype=tl.float32)
    acc_gw = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, K, BLOCK):
        mask = start + cols < K
        g = tl.load(g_ptr + start + cols, mask=mask, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + start + cols, mask=mask, other=0.0).to(tl.float32)
        acc_g += g
        acc_gw += g * tl.where(mask, (w - mean) * rstd, 0.0)
    mean_g = tl.sum(acc_g, axis=0) / K
    mean_gw = tl.sum(acc_gw, axis=0) / K
    for start in range(0, K, BLOCK):
        mask = start + cols < K
        g = tl.load(g_ptr + start + cols, mask=mask, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + start + cols, mask=mask, other=0.0).to(tl.float32)
        dw = rstd * (g - mean_g - (w - mean) * rstd * mean_gw)
        tl.store(dw_ptr + start + cols, dw.to(dw_ptr.dtype.element_ty), mask=mask)


@dataclass(frozen=True)
class Plan:
    """One launch of either kernel: one program per output channel, a fixed row chunk, fixed warps."""

    grid: tuple[int]
    block: int
    num_warps: int


# One config, no autotuning: in inference the standardized weights are computed once per process and
# cached, so a compile costs far more than any tuning could save. 1024 float32 on 4 warps is 8 per
# thread (no spills); K = 2304 takes 3 steps per sweep, re-read from L1/L2.
GPU_BLOCK, GPU_WARPS = 1024, 4
# The interpreter's block is small so the tests' fan-ins (1 … 4,680) cover single, partial and many steps.
INTERPRETER_BLOCK = 64
# Tests' hook: run the GPU's block under the interpreter.
_FORCE_GPU_BLOCK = False


def plan(out_channels: int, fan_in: int, interpreter: bool = False) -> Plan:
    """The launch for a weight of `out_channels` rows of `fan_in` elements (same for forward and backward)."""
    block = INTERPRETER_BLOCK if interpreter else GPU_BLOCK
    return Plan((out_channels,), block, GPU_WARPS)


def _active_plan(out_channels: int, fan_in: int) -> Plan:
    return plan(out_channels, fan_in, interpreter_enabled() and not _FORCE_GPU_BLOCK)


def _rows(w: torch.Tensor) -> torch.Tensor:
    """w with each output channel a contiguous span (in place if contiguous or channels_last)."""
    if w.is_contiguous() or (w.dim() == 4 and w.is_contiguous(memory_format=torch.channels_last)):
        return w
    return w.contiguous()


def _check(w: torch.Tensor) -> None:
    check_launchable("weight_standardize", w)
    if w.dim() < 2 or w.numel() == 0:
        raise ValueError(
            f"weight_standardize: expected a non-empty weight (O, I, ...) with at least 2 dims, "
            f"got shape {tuple(w.shape)}"
        )


def launch_forward(w: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch only (no checks): (out, mean, rstd); out in the layout of `_rows(w)`."""
    rows = _rows(w)
    out_ch, k = rows.shape[0], rows.numel() // rows.shape[0]
    out = torch.empty_like(rows)  # preserve_format keeps channels_last
    mean = torch.empty(out_ch, device=w.device, dtype=torch.float32)
    rstd = torch.empty_like(mean)
    p = _active_plan(out_ch, k)
    _weight_standardize_fwd[p.grid](rows, out, mean, rstd, eps, k, BLOCK=p.block, num_warps=p.num_warps)
    return out, mean, rstd


def launch_backward(grad_out: torch.Tensor, w: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor) -> torch.Tensor:
    """dL/dw for the standardized weight, in the layout of `_rows(w)`."""
    rows = _rows(w)
    if rows.is_contiguous():
        grad_out = grad_out.contiguous()
    else:  # rows is channels_last: the gradient must walk each channel in the same order
        grad_out = grad_out.contiguous(memory_format=torch.channels_last)
    out_ch, k = rows.shape[0], rows.numel() // rows.shape[0]
    dw = torch.empty_like(rows)
    p = _active_plan(out_ch, k)
    _weight_standardize_bwd[p.grid](grad_out, rows, mean, rstd, dw, k, BLOCK=p.block, num_warps=p.num_warps)
    return dw


# Custom ops (as in kernels/attention.py): torch.compile sees one opaque node per call, no graph break.
# The fake (meta) implementations return the same layout as the launchers: `_rows` only inspects strides.
@custom_op("vithybrid::weight_standardize")
def _weight_standardize_op(w: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return launch_forward(w, eps)


@_weight_standardize_op.register_fake
def _(w: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    stats = w.new_empty(w.shape[0], dtype=torch.float32)
    return torch.empty_like(_rows(w)), stats, torch.empty_like(stats)


@custom_op("vithybrid::weight_standardize_backward")
def _weight_standardize_backward_op(
    grad_out: torch.Tensor, w: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor
) -> torch.Tensor:
    return launch_backward(grad_out, w, mean, rstd)


@_weight_standardize_backward_op.register_fake
def _(grad_out: torch.Tensor, w: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(_rows(w))


def _setup_context(ctx, inputs, output) -> None:
    w, _ = inputs
    _, mean, rstd = output
    ctx.save_for_backward(w, mean, rstd)  # w itself, not a copy: a strided w is re-copied in the backward


def _backward_rule(ctx, grad_out, grad_mean, grad_rstd):
    # mean and rstd are internal by-products (never handed to users): their gradients are ignored.
    w, mean, rstd = ctx.saved_tensors
    return run(ctx, _weight_standardize_backward_op, grad_out, w, mean, rstd), None


_weight_standardize_op.register_autograd(_backward_rule, setup_context=_setup_context)
_weight_standardize_eager = twin(_weight_standardize_op, _setup_context, _backward_rule, materialize_grads=False)


def weight_standardize(w: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Per-output-channel (w − mean) / sqrt(biased var + eps) of a conv weight (O, I, kh, kw), in w.dtype.

    Differentiable (Triton backward). Contiguous and channels_last weights are read in place and the
    result keeps their memory format; other layouts are copied to contiguous first. Backed by the torch
    custom op `vithybrid::weight_standardize`, so torch.compile traces it without a graph break.
    """
    _check(w)
    if not needs_registered_op(w):
        return launch_forward(w, float(eps))[0]
    return call(_weight_standardize_op, _weight_standardize_eager, w, float(eps))[0]


def offline_launches(dtype: torch.dtype, batches: list[int], arch: int | None = None) -> list:
    """One forward (inference: once per conv, then cached) and one backward launch per distinct conv weight.

    The plan depends on neither batch nor GPU; K's divisibility by 16 is what Triton specializes.
    """
    from ._backbone_calls import conv_weight_shapes
    from ._offline import Launch, TensorArg

    t, f32 = TensorArg(dtype), TensorArg(torch.float32)
    launches = []
    for shape in sorted(set(conv_weight_shapes())):
        out_ch, k = shape[0], int(torch.Size(shape[1:]).numel())
        p = plan(out_ch, k)
        config = triton.Config({}, num_warps=p.num_warps)
        fwd = dict(w_ptr=t, out_ptr=t, mean_ptr=f32, rstd_ptr=f32, eps=1e-8, K=k, BLOCK=p.block)
        bwd = dict(g_ptr=t, w_ptr=t, mean_ptr=f32, rstd_ptr=f32, dw_ptr=t, K=k, BLOCK=p.block)
        launches.append(Launch(f"weight_standardize {tuple(shape)}", _weight_standardize_fwd, fwd, [config]))
        launches.append(Launch(f"weight_standardize backward {tuple(shape)}", _weight_standardize_bwd, bwd, [config],
                               "backward"))  # fmt: skip
    return launches
