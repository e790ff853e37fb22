"""Backward of `kernels.group_norm_act`: dx, d residual, dweight, dbias from the saved mean and rstd.

With gz = gy·[y > 0] (ReLU mask from the saved output, or gy without an activation) and
x̂ = (x − mean)·rstd: `_gn_bwd_reduce` sums Σ gz and Σ gz·x̂ per (n, c, chunk) (chunking from
`reduce_plan`); torch finishes the (N, G) coefficients A = mean(gz·w), B = mean(gz·w·x̂);
the apply writes dx = rstd·(w·gz − A − x̂·B) and d residual = gz; dw = Σ gz·x̂, db = Σ gz. In NCHW the
apply is `_gn_bwd_apply_grouped`, flat blocks of a group's contiguous span with one config (like the
forward's), and the reduction one (32 × 64) tile: few compiles. Channels-last takes the autotuned
(channel × spatial) `_gn_bwd_apply`. Every forward path saves the same (N, G) float32 mean and rstd.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._group_norm_act_layout import _dense, _layout, _span_block, _to_layout
from ._group_norm_act_plan import GPU_BLOCKS, INTERPRETER_BLOCKS, cdiv, reduce_plan
from ._group_norm_act_tiles import _apply_tile, _tile_offsets, tuned_apply
from ._tuning import jit


@jit(constexpr_under_interpreter=["ITERS"], do_not_specialize=["G", "CG", "P", "ITERS"])
def _gn_bwd_reduce(
    gy_ptr,  # (N, C, S) upstream gradient, x's layout
    y_ptr,  # (N, C, S) forward output (ReLU mask) or unused
    x_ptr,  # (N, C, S) forward input
    mean_ptr,  # (N, G) float32
    rstd_ptr,  # (N, G) float32
    part_ds_ptr,  # (N, C, P) float32 out: Σ gz
    part_dxh_ptr,  # (N, C, P) float32 out: Σ gz·x̂
    C,
    S,
    G,
    CG,
    P,
    ITERS,  # BLOCK_S blocks per chunk
    RELU: tl.constexpr,
    CHANNELS_LAST: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    chunk, n, pid_c = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    image = n.to(tl.int64) * C * S
    cs = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = cs < C
    grp = n * G + cs // CG
    mean = tl.load(mean_ptr + grp, mask=c_mask, other=0.0)
    rstd = tl.load(rstd_ptr + grp, mask=c_mask, other=0.0)
    acc_ds = tl.zeros([BLOCK_C, BLOCK_S], dtype=tl.float32)
    acc_dxh = tl.zeros([BLOCK_C, BLOCK_S], dtype=tl.float32)
    for it in range(ITERS):
        ss = (chunk * ITERS + it) * BLOCK_S + tl.arange(0, BLOCK_S)
        mask = c_mask[:, None] & (ss < S)[None, :]
        offs = image + _tile_offsets(cs, ss, C, S, CHANNELS_LAST)
        gz = tl.load(gy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if RELU:
            gz = tl.where(tl.load(y_ptr + offs, mask=mask, other=0.0) > 0, gz, 0.0)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        acc_ds += gz
        acc_dxh += gz * ((x - mean[:, None]) * rstd[:, None])
    dst = (n * C + cs) * P + chunk
    tl.store(part_ds_ptr + dst, tl.sum(acc_ds, axis=1), mask=c_mask)
    tl.store(part_dxh_ptr + dst, tl.sum(acc_dxh, axis=1), mask=c_mask)


@triton.jit
def _store_input_grads(
    gy_ptr, y_ptr, x_ptr, gx_ptr, gz_ptr, offs, mask, mean, rstd, coef_a, coef_b, w,
    RELU: tl.constexpr, WRITE_GZ: tl.constexpr,
):  # fmt: skip
    """dx = rstd·(w·gz − a − x̂·b) at `offs`, gz = gy·[y > 0]; also stores gz (the residual's gradient)."""
    gz = tl.load(gy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if RELU:
        gz = tl.where(tl.load(y_ptr + offs, mask=mask, other=0.0) > 0, gz, 0.0)
    x_hat = (tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32) - mean) * rstd
    gx = rstd * (w * gz - coef_a - x_hat * coef_b)
    tl.store(gx_ptr + offs, gx.to(gx_ptr.dtype.element_ty), mask=mask)
    if WRITE_GZ:
        tl.store(gz_ptr + offs, gz.to(gz_ptr.dtype.element_ty), mask=mask)


@jit(do_not_specialize=["N", "G", "CG"])
def _gn_bwd_apply(
    gy_ptr,  # (N, C, S) upstream gradient, x's layout
    y_ptr,  # (N, C, S) forward output (ReLU mask) or unused
    x_ptr,  # (N, C, S) forward input
    mean_ptr,  # (N, G) float32
    rstd_ptr,  # (N, G) float32
    coef_a_ptr,  # (N, G) float32: mean over the group of gz·w
    coef_b_ptr,  # (N, G) float32: mean over the group of gz·w·x̂
    w_ptr,  # (C,) GroupNorm weight
    gx_ptr,  # (N, C, S) out: dL/dx, x's layout
    gz_ptr,  # (N, C, S) out: dL/d(residual) = gy·[y > 0], or unused
    N,  # only an autotune key
    C,
    S,
    G,
    CG,
    RELU: tl.constexpr,
    WRITE_GZ: tl.constexpr,
    CHANNELS_LAST: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    image, cs, c_mask, mask, grp, offs = _apply_tile(C, S, G, CG, CHANNELS_LAST, BLOCK_C, BLOCK_S)
    mean = tl.load(mean_ptr + grp, mask=c_mask, other=0.0)[:, None]
    rstd = tl.load(rstd_ptr + grp, mask=c_mask, other=0.0)[:, None]
    coef_a = tl.load(coef_a_ptr + grp, mask=c_mask, other=0.0)[:, None]
    coef_b = tl.load(coef_b_ptr + grp, mask=c_mask, other=0.0)[:, None]
    w = tl.load(w_ptr + cs, mask=c_mask, other=0.0).to(tl.float32)[:, None]
    _store_input_grads(
        gy_ptr, y_ptr, x_ptr, gx_ptr, gz_ptr, image + offs, mask, mean, rstd, coef_a, coef_b, w, RELU, WRITE_GZ
    )


@jit(do_not_specialize=["S", "G", "CG", "TILES"])
def _gn_bwd_apply_grouped(
    gy_ptr,  # (N, C, S) NCHW upstream gradient
    y_ptr,  # (N, C, S) NCHW forward output (ReLU mask) or unused
    x_ptr,  # (N, C, S) NCHW forward input
    mean_ptr,  # (N, G) float32
    rstd_ptr,  # (N, G) float32
    coef_a_ptr,  # (N, G) float32: mean over the group of gz·w
    coef_b_ptr,  # (N, G) float32: mean over the group of gz·w·x̂
    w_ptr,  # (C,) GroupNorm weight
    gx_ptr,  # (N, C, S) out: dL/dx
    gz_ptr,  # (N, C, S) out: dL/d(residual) = gy·[y > 0], or unused
    S,
    G,
    CG,
    L,  # CG·S elements per group
    TILES,  # cdiv(L, BLOCK) programs per group
    RELU: tl.constexpr,
    WRITE_GZ: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # NCHW: one flat block of one group's contiguous span per program, one config for every shape.
    pid = tl.program_id(0)  # (n·G + g)·TILES + tile
    row, tile = pid // TILES, pid % TILES
    mean, rstd = tl.load(mean_ptr + row), tl.load(rstd_ptr + row)
    coef_a, coef_b = tl.load(coef_a_ptr + row), tl.load(coef_b_ptr + row)
    offs, mask, channel = _span_block(tile * BLOCK, L, S, BLOCK)
    offs += row.to(tl.int64) * L
    w = tl.load(w_ptr + (row % G) * CG + channel, mask=mask, other=0.0).to(tl.float32)
    _store_input_grads(gy_ptr, y_ptr, x_ptr, gx_ptr, gz_ptr, offs, mask, mean, rstd, coef_a, coef_b, w, RELU, WRITE_GZ)


_gn_bwd_apply_tuned = tuned_apply("group_norm_act_bwd_apply", _gn_bwd_apply)


def bwd_apply_block(interpreter: bool) -> int:
    """The NCHW backward apply's flat block: the forward apply's (one config, no autotuning)."""
    return (INTERPRETER_BLOCKS if interpreter else GPU_BLOCKS).apply


def launch_backward(gy, y, x, weight, mean, rstd, relu: bool, need_gz: bool, sm_count: int, small_blocks: bool):
    """(dx, d residual or None, dw, db), dw and db float32 sums; dx and d residual in `_dense(x)`'s layout.

    `x` and `weight` (None: ones) are the forward's inputs, `y` its output (read only when `relu`).
    `sm_count` and `small_blocks` are the plans' inputs, from group_norm_act.py's `_sm_count_or_one` and
    `_small_blocks`: its test hooks, read there so this module needs nothing from that one.
    """
    x = _dense(x)
    channels_last = bool(_layout(x))
    gy = _to_layout(gy, channels_last)
    y = gy if y is None else y  # act=None: the mask pointer is never read
    n, c, num_groups = x.shape[0], x.shape[1], mean.shape[1]
    weight = torch.ones(c, device=x.device, dtype=x.dtype) if weight is None else weight
    if x.numel() == 0:
        zeros = weight.new_zeros(c, dtype=torch.float32)
        return torch.zeros_like(x), (torch.zeros_like(x) if need_gz else None), zeros, zeros.clone()
    s, cg = x.numel() // (n * c), c // mean.shape[1]
    block_c, block_s, iters, chunks = reduce_plan(n, c, s, channels_last, sm_count, small_blocks)
    # Σ gz and Σ gz·x̂ per (n, c, chunk) in one tensor, so that the (N, C)-sized bookkeeping below runs each
    # torch op once for both (6 small launches per backward instead of 10: a training step makes ~50 of these
    # backwards, and it waited on the host, session 19)
    parts = torch.empty(2, n, c, chunks, device=x.device, dtype=torch.float32)
    part_ds, part_dxh = parts[0], parts[1]
    _gn_bwd_reduce[(chunks, n, cdiv(c, block_c))](
        gy, y, x, mean, rstd, part_ds, part_dxh, c, s, num_groups, cg, chunks, iters,
        RELU=relu, CHANNELS_LAST=channels_last, BLOCK_C=block_c, BLOCK_S=block_s, num_warps=4,
    )  # fmt: skip
    # (N, C)-sized bookkeeping in torch: little device time next to the two passes over (N, C, S).
    sums = parts.sum(-1)  # (2, N, C): Σ gz, Σ gz·x̂
    coefs = (sums * weight.float()).view(2, n, num_groups, cg).sum(-1).div_(cg * s)
    coef_a, coef_b = coefs[0], coefs[1]
    gx = torch.empty_like(x)
    gz = torch.empty_like(x) if need_gz and relu else None

    gz_out = gx if gz is None else gz
    if channels_last:

        def grid(meta: dict) -> tuple[int, int, int]:
            return (cdiv(s, meta["BLOCK_S"]), n, cdiv(c, meta["BLOCK_C"]))

        _gn_bwd_apply_tuned[grid](
            gy, y, x, mean, rstd, coef_a, coef_b, weight, gx, gz_out, n, c, s, num_groups, cg,
            RELU=relu, WRITE_GZ=gz is not None, CHANNELS_LAST=True,
        )  # fmt: skip
    else:
        block = bwd_apply_block(small_blocks)
        tiles = cdiv(cg * s, block)
        _gn_bwd_apply_grouped[(n * num_groups * tiles,)](
            gy, y, x, mean, rstd, coef_a, coef_b, weight, gx, gz_out, s, num_groups, cg, cg * s, tiles,
            RELU=relu, WRITE_GZ=gz is not None, BLOCK=block, num_warps=4,
        )  # fmt: skip
    if need_gz and not relu:
        gz = gy
    # over the batch, Σ gz·x̂ and Σ gz per channel: two tensors (a custom op's outputs may not share storage)
    return gx, gz, sums[1].sum(0), sums[0].sum(0)
