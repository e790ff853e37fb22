"""Residual add + LayerNorm for training under autocast, forward and backward: `h = x + residual; y = LN(h)`.

Why: under bf16/fp16 autocast with float32 weights (how `finetune` trains) the encoder's glue is torch's:
each attention branch's bf16 output is added to the float32 residual stream by a mixed-dtype add, LayerNorm
runs in float32 (autocast's rule), and the next GEMM casts its float32 output to bf16; the backward runs
each of those again. The H200 profile of a bf16 training step at batch 64 (bench/results/
nvidia-h200-2026-11-27-run3-notes.md) had torch's float32 LayerNorm forward and backward at 8.05 ms, the
float32 adds at 4.59 ms and copies and casts at 5.89 ms of 97 ms of kernels. This op does the add, the
statistics and the normalisation in one pass (h written in float32, y written once in autocast's dtype),
and the backward in one more: dh = LN'(dy) + the gradient h receives downstream, written as the residual's
gradient (float32) and as the branch's (bf16), with the weight and bias gradients reduced per program.

Numerics, as autocast's unfused ops compute them: h = x + residual in torch's promoted dtype (float32 math,
one rounding); LayerNorm of h in float32 (statistics as kernels/add_layer_norm.py takes them), y rounded
once to `out_dtype` (what the next GEMM's autocast cast makes of torch's float32 output). Backward in
float32 from dy as given (autocast's cast passes the bf16 gradient on upcast): dh = rstd·(w·dy − mean(w·dy)
− x̂·mean(x̂·w·dy)) + dh_downstream; the branch's gradient is dh rounded to its dtype, as torch's add
backward casts it. Shapes: x and residual (…, N) of one shape, any float dtypes; weight, bias (N,); N ≤ 8192.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._eager import call, custom_op, run, twin
from ._runtime import device_limits, interpreter_enabled, needs_registered_op
from ._tuning import jit
from .add_layer_norm import _add_layer_norm_kernel, _rows, _warps, check_inputs

# Programs per SM of the backward: each sweeps a run of rows and keeps its weight/bias partial sums in
# registers; a few per SM keep HBM busy, and the partials (programs × N floats, twice) stay small.
BWD_PROGRAMS_PER_SM = 4
INTERPRETER_BWD_PROGRAMS = 3  # several rows per program in the tests' small shapes, and a ragged last one


def reference(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
    out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-torch twin, what autocast's unfused ops compute: (x + residual, LN(h) in float32 → out_dtype)."""
    h = x if residual is None else x + residual
    wide = torch.promote_types(h.dtype, torch.float32)
    y = torch.nn.functional.layer_norm(h.to(wide), (h.shape[-1],), weight.to(wide), bias.to(wide), eps)
    return h, y.to(out_dtype or h.dtype)


# No FMA contraction: contracted, w·dy − (x̂·c1 + c2) subtracts c2 (a mean of the rounded products) from the
# unrounded product, and where the true difference is zero (a row of one element: dx = 0 exactly) it is
# the product's rounding error times rstd (up to 1000 at eps 1e-6): 3e-5 on the H200 (session 19), where
# torch's float32 backward gives 0. Memory-bound, so the separate multiply costs nothing measurable.
@jit(constexpr_under_interpreter=["ROWS"], do_not_specialize=["M", "ROWS"], fp_fusion=False)
def _add_layer_norm_bwd_kernel(
    dy_ptr,  # (M, N) gradient of y, y's dtype
    dh_ptr,  # (M, N) gradient h receives downstream (unused without HAS_DH)
    h_ptr,  # (M, N) the forward's h (x itself without a residual)
    mean_ptr,  # (M,) float32, the forward's
    rstd_ptr,  # (M,) float32, the forward's
    w_ptr,  # (N,) LayerNorm weight
    dx_ptr,  # (M, N) out: x's gradient, x's dtype
    dr_ptr,  # (M, N) out: the residual's gradient, its dtype (unused without HAS_RESIDUAL)
    dw_part_ptr,  # (P, N) float32 out: this program's sum of dy·x̂
    db_part_ptr,  # (P, N) float32 out: this program's sum of dy
    M,
    N,
    stride_dy,
    stride_dh,
    stride_h,
    stride_dx,
    stride_dr,
    ROWS,  # rows per program
    HAS_DH: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK_N: tl.constexpr,  # next power of two ≥ N
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    n = N * 1.0
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    dw_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    db_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for i in range(ROWS):
        row = pid * ROWS + i
        # the last program's run may pass the end: its rows load zeros and add nothing (the row test as a
        # block: Triton 3.9's interpreter refuses a scalar and a block combined into a mask)
        live = mask & (cols * 0 + row < M)
        r64 = row.to(tl.int64)
        h = tl.load(h_ptr + r64 * stride_h + cols, mask=live, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + r64 * stride_dy + cols, mask=live, other=0.0).to(tl.float32)
        mean = tl.load(mean_ptr + tl.minimum(row, M - 1))  # a row past the end reads the last (unused)
        rstd = tl.load(rstd_ptr + tl.minimum(row, M - 1))
        xhat = tl.where(live, (h - mean) * rstd, 0.0)
        wdy = w * dy
        c1 = tl.sum(xhat * wdy, axis=0) / n
        c2 = tl.sum(wdy, axis=0) / n
        dh = (wdy - (xhat * c1 + c2)) * rstd
        if HAS_DH:
            dh += tl.load(dh_ptr + r64 * stride_dh + cols, mask=live, other=0.0).to(tl.float32)
        tl.store(dx_ptr + r64 * stride_dx + cols, dh.to(dx_ptr.dtype.element_ty), mask=live)
        if HAS_RESIDUAL:
            tl.store(dr_ptr + r64 * stride_dr + cols, dh.to(dr_ptr.dtype.element_ty), mask=live)
        dw_acc += dy * xhat
        db_acc += dy
    tl.store(dw_part_ptr + pid * N + cols, dw_acc, mask=mask)
    tl.store(db_part_ptr + pid * N + cols, db_acc, mask=mask)


def _bwd_warps(block_n: int) -> int:
    """8 warps to 4096-wide rows, 16 beyond. At ViT-Base's 768 (block 1024, sm_90, bf16, offline) 4 warps
    spilled under Triton 3.6 (the LayerNorm-before backward: 72 registers, 12 spilled), 8 take 47–55, none."""
    return 8 if block_n <= 4096 else 16


def _h_dtype(x: torch.Tensor, residual: torch.Tensor | None) -> torch.dtype:
    return x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)


def launch_forward(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
    out_dtype: torch.dtype,
    save_stats: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch only: (h, y, mean, rstd); h is x itself without a residual; mean/rstd empty unless save_stats."""
    n = x.shape[-1]
    x2 = _rows(x)
    r2 = _rows(residual) if residual is not None else x2
    m = x2.shape[0]
    weight, bias = weight.contiguous(), bias.contiguous()
    y = torch.empty(x.shape, device=x.device, dtype=out_dtype)
    h = torch.empty(x.shape, device=x.device, dtype=_h_dtype(x, residual)) if residual is not None else x
    stats = m if save_stats else 0
    mean = torch.empty(stats, device=x.device, dtype=torch.float32)
    rstd = torch.empty(stats, device=x.device, dtype=torch.float32)
    y2 = y.view(-1, n)
    h2 = h.view(-1, n) if residual is not None else y2
    if m > 0:
        block_n = triton.next_power_of_2(n)
        _add_layer_norm_kernel[(m,)](
            x2, r2, weight, bias, h2, y2, mean if save_stats else y2, rstd if save_stats else y2, n,
            x2.stride(0), r2.stride(0), h2.stride(0), y2.stride(0), eps, HAS_RESIDUAL=residual is not None,
            SAVE_STATS=save_stats, BLOCK_N=block_n, num_warps=_warps(block_n),
        )  # fmt: skip
    return h, y, mean, rstd


def backward_programs(m: int, sm_count: int, interpreter: bool = False) -> tuple[int, int]:
    """(programs, rows per program) of the backward for m rows: a few programs per SM, none empty."""
    if m == 0:
        return 0, 0
    wanted = INTERPRETER_BWD_PROGRAMS if interpreter else BWD_PROGRAMS_PER_SM * sm_count
    rows = triton.cdiv(m, min(m, wanted))
    return triton.cdiv(m, rows), rows


def launch_backward(
    dy: torch.Tensor,
    dh: torch.Tensor | None,
    h: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    weight: torch.Tensor,
    x_dtype: torch.dtype,
    residual_dtype: torch.dtype | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch only: (dx, dresidual, dweight, dbias); dresidual is empty without a residual."""
    n = h.shape[-1]
    h2, dy2 = _rows(h), _rows(dy)
    dh2 = _rows(dh) if dh is not None else dy2
    m = h2.shape[0]
    dx = torch.empty(h.shape, device=h.device, dtype=x_dtype)
    has_residual = residual_dtype is not None
    dr = torch.empty(h.shape if has_residual else 0, device=h.device, dtype=residual_dtype or x_dtype)
    programs, rows = backward_programs(m, device_limits(h.device)[0], interpreter_enabled())
    dw_part = torch.empty((programs, n), device=h.device, dtype=torch.float32)
    db_part = torch.empty((programs, n), device=h.device, dtype=torch.float32)
    dx2 = dx.view(-1, n)
    dr2 = dr.view(-1, n) if has_residual else dx2
    if m > 0:
        block_n = triton.next_power_of_2(n)
        _add_layer_norm_bwd_kernel[(programs,)](
            dy2, dh2, h2, mean, rstd, weight.contiguous(), dx2, dr2, dw_part, db_part, m, n, dy2.stride(0),
            dh2.stride(0), h2.stride(0), dx2.stride(0), dr2.stride(0), rows, HAS_DH=dh is not None,
            HAS_RESIDUAL=has_residual, BLOCK_N=block_n, num_warps=_bwd_warps(block_n),
        )  # fmt: skip
    dweight = dw_part.sum(0).to(weight.dtype)
    dbias = db_part.sum(0).to(weight.dtype)
    return dx, dr, dweight, dbias


# Custom ops: one opaque node each for torch.compile (finetune --compile), and the autograd rule. mean/rstd
# are outputs only so the backward can have them (never handed to users; their gradients are ignored).
@custom_op("vithybrid::add_layer_norm_train")
def _add_layer_norm_train_op(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
    out_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    return launch_forward(x, residual, weight, bias, eps, out_dtype)


@_add_layer_norm_train_op.register_fake
def _(x, residual, weight, bias, eps, out_dtype):
    rows = x.numel() // x.shape[-1]
    return (
        x.new_empty(x.shape, dtype=_h_dtype(x, residual)), x.new_empty(x.shape, dtype=out_dtype),
        x.new_empty(rows, dtype=torch.float32), x.new_empty(rows, dtype=torch.float32),
    )  # fmt: skip


@custom_op("vithybrid::layer_norm_train")
def _layer_norm_train_op(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float, out_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _, y, mean, rstd = launch_forward(x, None, weight, bias, eps, out_dtype)
    return y, mean, rstd


@_layer_norm_train_op.register_fake
def _(x, weight, bias, eps, out_dtype):
    rows = x.numel() // x.shape[-1]
    return (
        x.new_empty(x.shape, dtype=out_dtype),
        x.new_empty(rows, dtype=torch.float32),
        x.new_empty(rows, dtype=torch.float32),
    )


@custom_op("vithybrid::add_layer_norm_train_backward")
def _backward_op(
    dy: torch.Tensor, dh: torch.Tensor | None, h: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
    weight: torch.Tensor, x_dtype: torch.dtype, residual_dtype: torch.dtype | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    return launch_backward(dy, dh, h, mean, rstd, weight, x_dtype, residual_dtype)


@_backward_op.register_fake
def _(dy, dh, h, mean, rstd, weight, x_dtype, residual_dtype):
    dr_shape = h.shape if residual_dtype is not None else (0,)
    return (
        h.new_empty(h.shape, dtype=x_dtype), h.new_empty(dr_shape, dtype=residual_dtype or x_dtype),
        weight.new_empty(weight.shape), weight.new_empty(weight.shape),
    )  # fmt: skip


def _setup_add(ctx, inputs, output) -> None:
    x, residual, weight, _, _, out_dtype = inputs
    h, _, mean, rstd = output
    ctx.save_for_backward(h, mean, rstd, weight)
    ctx.dtypes = (x.dtype, residual.dtype, out_dtype)


def _backward_add(ctx, dh, dy, _dmean, _drstd):
    h, mean, rstd, weight = ctx.saved_tensors
    x_dtype, residual_dtype, out_dtype = ctx.dtypes
    dy = dy if dy is not None else h.new_zeros(h.shape, dtype=out_dtype)
    dx, dr, dweight, dbias = run(ctx, _backward_op, dy, dh, h, mean, rstd, weight, x_dtype, residual_dtype)
    return dx, dr, dweight, dbias, None, None


_add_layer_norm_train_op.register_autograd(_backward_add, setup_context=_setup_add)
# dh None (h not used downstream) is the kernel's HAS_DH=False; dy None is filled above; mean, rstd ignored
_add_layer_norm_train_eager = twin(_add_layer_norm_train_op, _setup_add, _backward_add, materialize_grads=False)


def _setup_plain(ctx, inputs, output) -> None:
    x, weight, _, _, out_dtype = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, mean, rstd, weight)
    ctx.dtypes = (x.dtype, out_dtype)


def _backward_plain(ctx, dy, _dmean, _drstd):
    x, mean, rstd, weight = ctx.saved_tensors
    x_dtype, out_dtype = ctx.dtypes
    dy = dy if dy is not None else x.new_zeros(x.shape, dtype=out_dtype)
    dx, _, dweight, dbias = run(ctx, _backward_op, dy, None, x, mean, rstd, weight, x_dtype, None)
    return dx, dweight, dbias, None, None


_layer_norm_train_op.register_autograd(_backward_plain, setup_context=_setup_plain)
_layer_norm_train_eager = twin(_layer_norm_train_op, _setup_plain, _backward_plain, materialize_grads=False)


def add_layer_norm_train(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
    out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(h, LayerNorm(h)) with h = x + residual in torch's promoted dtype (x itself when residual is None) and
    the LayerNorm taken in float32, written in `out_dtype` (default h's); differentiable in every input."""
    check_inputs(x, residual, weight, bias, "add_layer_norm_train", same_dtype=False)
    out_dtype = out_dtype or _h_dtype(x, residual)
    if not needs_registered_op(x, residual, weight, bias):  # no gradient recorded: no statistics kept
        h, y, _, _ = launch_forward(x, residual, weight, bias, float(eps), out_dtype, save_stats=False)
        return h, y
    if residual is None:
        y, _, _ = call(_layer_norm_train_op, _layer_norm_train_eager, x, weight, bias, float(eps), out_dtype)
        return x, y
    h, y, _, _ = call(
        _add_layer_norm_train_op, _add_layer_norm_train_eager, x, residual, weight, bias, float(eps), out_dtype
    )
    return h, y


def offline_launches(dtype: torch.dtype, batches: list[int], arch: int | None = None) -> list:
    """Training under autocast (float32 stream and weights, `dtype` branches): per layer the + residual →
    LayerNorm-after and the LayerNorm-before, forward (statistics kept) and backward, at ViT-Base's width."""
    from ._offline import GPUS, HIDDEN, TOKENS, Launch, TensorArg

    if dtype == torch.float32:
        return []  # autocast runs in a half dtype
    wide, half = TensorArg(torch.float32), TensorArg(dtype)
    block_n = triton.next_power_of_2(HIDDEN)
    config = [triton.Config({}, num_warps=_warps(block_n))]
    sms = GPUS[arch or 90][0]
    launches = []
    for has_residual in (True, False):
        name = "add_layer_norm_train" if has_residual else "layer_norm_train"
        args = dict(
            x_ptr=half if has_residual else wide, res_ptr=wide, w_ptr=wide, b_ptr=wide, h_ptr=wide, y_ptr=half,
            mean_ptr=wide, rstd_ptr=wide, N=HIDDEN, stride_x=HIDDEN, stride_r=HIDDEN, stride_h=HIDDEN,
            stride_y=HIDDEN, eps=1e-12, HAS_RESIDUAL=has_residual, SAVE_STATS=True, BLOCK_N=block_n,
        )  # fmt: skip
        launches.append(Launch(name, _add_layer_norm_kernel, args, config, phase="backward"))
        m = max(batches) * TOKENS  # M and ROWS are not specialized: one compile serves every batch
        rows = backward_programs(m, sms)[1]
        args = dict(
            dy_ptr=half, dh_ptr=wide, h_ptr=wide, mean_ptr=wide, rstd_ptr=wide, w_ptr=wide,
            dx_ptr=half if has_residual else wide, dr_ptr=wide, dw_part_ptr=wide, db_part_ptr=wide, M=m,
            N=HIDDEN, stride_dy=HIDDEN, stride_dh=HIDDEN, stride_h=HIDDEN, stride_dx=HIDDEN, stride_dr=HIDDEN,
            ROWS=rows, HAS_DH=has_residual, HAS_RESIDUAL=has_residual, BLOCK_N=block_n,
        )  # fmt: skip
        bwd_config = [triton.Config({}, num_warps=_bwd_warps(block_n))]
        launches.append(Launch(f"{name} backward", _add_layer_norm_bwd_kernel, args, bwd_config, phase="backward"))
    return launches
