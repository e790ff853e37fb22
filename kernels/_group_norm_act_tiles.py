"""(channel × spatial) tile kernels of `group_norm_act`: single pass, the channels-last split, the apply configs.

`_gn_fwd_single_pass` holds a whole (n, g) group as one padded (CG, S) register tile (either layout).

A channels-last group is not one contiguous span, and tiles narrower than ~128 channels read it
uncoalesced, so channels-last statistics are per channel over S-chunks (`_gn_stats`, exact two-pass
per block merged with Chan's formula), merged per group (`_gn_finalize`), then applied on autotuned
(channel × spatial) tiles (`_gn_apply`). The backward's apply (`_gn_bwd_apply`, in
kernels/_group_norm_act_backward.py) shares the tile configs and their prune here.

Loop trip counts (ITERS, E_ITERS) are runtime arguments: one compile serves every chunking. The batch
N is only an autotune key and `do_not_specialize`d, so batches 1, 8, 64 reuse one compiled kernel.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._group_norm_act_layout import _lane_counts, _welford_lanes
from ._group_norm_act_plan import next_pow2, span
from ._tuning import jit, tuned


@triton.jit
def _tile_offsets(cs, ss, C, S, CHANNELS_LAST: tl.constexpr):
    # (BLOCK_C, BLOCK_S) element offsets inside one image: NCHW c·S + s, channels-last s·C + c.
    if CHANNELS_LAST:
        offs = ss[None, :] * C + cs[:, None]
    else:
        offs = cs[:, None] * S + ss[None, :]
    return offs


@triton.jit
def _apply_tile(C, S, G, CG, CHANNELS_LAST: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    """The (BLOCK_C, BLOCK_S) tile of grid (spatial tile, n, channel tile) that the apply passes (forward
    and backward) read: image base, channels, positions, masks, (n, g) rows and in-image offsets."""
    pid_s, n, pid_c = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    image = n.to(tl.int64) * C * S
    cs = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    ss = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    c_mask = cs < C
    mask = c_mask[:, None] & (ss < S)[None, :]
    grp = n * G + cs // CG
    return image, cs, c_mask, mask, grp, _tile_offsets(cs, ss, C, S, CHANNELS_LAST)


@jit(constexpr_under_interpreter=["ITERS"], do_not_specialize=["P", "ITERS"])
def _gn_stats(
    x_ptr,  # (N, C, S) input in either layout
    part_mean_ptr,  # (N, C, P) float32 out: chunk means
    part_m2_ptr,  # (N, C, P) float32 out: chunk centred sums of squares
    C,
    S,
    P,  # chunks per channel
    ITERS,  # BLOCK_S blocks per chunk
    CHANNELS_LAST: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    chunk, n, pid_c = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    x_ptr += n.to(tl.int64) * C * S
    cs = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = cs < C
    # Welford per lane (channel × spatial slot), reduced across lanes once, after the loop, as the
    # backward's `_gn_bwd_reduce` does with its sums. Reducing each tile inside the loop (the first
    # version) put 28 barriers (sm_90 PTX) between one 4 KB load and the next; the H200 profile
    # (bench/results/nvidia-h200-2026-11-26-run3-notes.md) had this pass at 12.1 ms of 40.4 per forward.
    # Unrolled by two, each warp has two tiles' loads in flight and the loop no barrier (PTX, offline).
    lane_mean = tl.zeros([BLOCK_C, BLOCK_S], dtype=tl.float32)
    lane_m2 = tl.zeros([BLOCK_C, BLOCK_S], dtype=tl.float32)
    chunk_start = chunk * ITERS * BLOCK_S
    for it in tl.range(ITERS, loop_unroll_factor=2):
        ss = chunk_start + it * BLOCK_S + tl.arange(0, BLOCK_S)
        mask = c_mask[:, None] & (ss < S)[None, :]
        x = tl.load(x_ptr + _tile_offsets(cs, ss, C, S, CHANNELS_LAST), mask=mask, other=0.0).to(tl.float32)
        lane_mean, lane_m2 = _welford_lanes(lane_mean, lane_m2, x, mask, 1.0 / (it + 1.0))
    # Chan's merge of the lanes, in two passes (the chunk's mean, then the lanes' spread about it); every
    # channel's lane at one position took the same count.
    counts = _lane_counts(chunk_start, S, ITERS, BLOCK_S)
    total = tl.maximum(tl.sum(counts, axis=0), 1.0)
    lane_count = counts[None, :]
    mean = tl.sum(lane_mean * lane_count, axis=1) / total
    mean += tl.sum((lane_mean - mean[:, None]) * lane_count, axis=1) / total  # a constant gives itself
    spread = lane_mean - mean[:, None]
    m2 = tl.sum(lane_m2 + spread * spread * lane_count, axis=1)
    dst = (n * C + cs) * P + chunk
    tl.store(part_mean_ptr + dst, mean, mask=c_mask)
    tl.store(part_m2_ptr + dst, m2, mask=c_mask)


@jit(constexpr_under_interpreter=["E_ITERS"], do_not_specialize=["S", "P", "CHUNK_S", "CG", "E_ITERS"])
def _gn_finalize(
    part_mean_ptr,  # (N, C, P) float32 from _gn_stats
    part_m2_ptr,  # (N, C, P) float32 from _gn_stats
    mean_ptr,  # (N, G) float32 out
    rstd_ptr,  # (N, G) float32 out
    S,
    P,
    CHUNK_S,  # spatial positions per chunk (ITERS · BLOCK_S of the stats pass)
    eps,
    CG,  # channels per group
    E_ITERS,  # cdiv(CG · P, BLOCK_E)
    BLOCK_E: tl.constexpr,
):
    row = tl.program_id(0)  # n·G + g; its CG·P partials are contiguous at (n·C + g·CG)·P
    n_entries = CG * P
    base = row.to(tl.int64) * n_entries
    total = CG * S * 1.0  # float32 count
    acc = tl.zeros([BLOCK_E], dtype=tl.float32)
    for i in range(E_ITERS):
        e = i * BLOCK_E + tl.arange(0, BLOCK_E)
        mask = e < n_entries
        cnt = tl.minimum(tl.maximum(S - (e % P) * CHUNK_S, 0), CHUNK_S).to(tl.float32)
        acc += tl.where(mask, cnt * tl.load(part_mean_ptr + base + e, mask=mask, other=0.0), 0.0)
    mean = tl.sum(acc, axis=0) / total
    acc = tl.zeros([BLOCK_E], dtype=tl.float32)
    for i in range(E_ITERS):
        e = i * BLOCK_E + tl.arange(0, BLOCK_E)
        mask = e < n_entries
        cnt = tl.minimum(tl.maximum(S - (e % P) * CHUNK_S, 0), CHUNK_S).to(tl.float32)
        delta = tl.load(part_mean_ptr + base + e, mask=mask, other=0.0) - mean
        m2 = tl.load(part_m2_ptr + base + e, mask=mask, other=0.0)
        acc += tl.where(mask, m2 + cnt * delta * delta, 0.0)
    tl.store(mean_ptr + row, mean)
    tl.store(rstd_ptr + row, 1.0 / tl.sqrt(tl.sum(acc, axis=0) / total + eps))


@jit(do_not_specialize=["N", "G", "CG"])
def _gn_apply(
    x_ptr,  # (N, C, S) input
    res_ptr,  # (N, C, S) residual (own layout) or unused
    y_ptr,  # (N, C, S) output, x's layout and dtype
    w_ptr,  # (C,) GroupNorm weight
    b_ptr,  # (C,) GroupNorm bias
    mean_ptr,  # (N, G) float32
    rstd_ptr,  # (N, G) float32
    N,  # only an autotune key: batch 1 and 64 want different tiles
    C,
    S,
    G,
    CG,
    HAS_RES: tl.constexpr,
    RELU: tl.constexpr,
    CHANNELS_LAST: tl.constexpr,
    RES_CHANNELS_LAST: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    image, cs, c_mask, mask, grp, offs = _apply_tile(C, S, G, CG, CHANNELS_LAST, BLOCK_C, BLOCK_S)
    mean = tl.load(mean_ptr + grp, mask=c_mask, other=0.0)
    scale = tl.load(rstd_ptr + grp, mask=c_mask, other=0.0) * tl.load(w_ptr + cs, mask=c_mask).to(tl.float32)
    shift = tl.load(b_ptr + cs, mask=c_mask).to(tl.float32)
    x = tl.load(x_ptr + image + offs, mask=mask, other=0.0).to(tl.float32)
    y = (x - mean[:, None]) * scale[:, None] + shift[:, None]
    if HAS_RES:
        ss = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
        res_offs = _tile_offsets(cs, ss, C, S, RES_CHANNELS_LAST)
        y += tl.load(res_ptr + image + res_offs, mask=mask, other=0.0).to(tl.float32)
    if RELU:
        y = tl.where(y < 0.0, 0.0, y)  # not maximum(): keeps NaN like torch.relu
    tl.store(y_ptr + image + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@jit
def _gn_fwd_single_pass(
    x_ptr,  # (N, C, S) input
    res_ptr,  # (N, C, S) residual (own layout) or unused
    y_ptr,  # (N, C, S) output, x's layout and dtype
    w_ptr,  # (C,) GroupNorm weight
    b_ptr,  # (C,) GroupNorm bias
    mean_ptr,  # (N, G) float32 out
    rstd_ptr,  # (N, G) float32 out
    C,
    S,
    G,
    CG,
    eps,
    HAS_RES: tl.constexpr,
    RELU: tl.constexpr,
    CHANNELS_LAST: tl.constexpr,
    RES_CHANNELS_LAST: tl.constexpr,
    BLOCK_CG: tl.constexpr,  # next_power_of_2(CG)
    BLOCK_S: tl.constexpr,  # next_power_of_2(S)
):
    row = tl.program_id(0)  # n·G + g: the whole group is this program's one tile
    n, g = row // G, row % G
    image = n.to(tl.int64) * C * S
    c_local = tl.arange(0, BLOCK_CG)
    cs = g * CG + c_local
    ss = tl.arange(0, BLOCK_S)
    c_mask = c_local < CG
    mask = c_mask[:, None] & (ss < S)[None, :]
    offs = _tile_offsets(cs, ss, C, S, CHANNELS_LAST)
    x = tl.load(x_ptr + image + offs, mask=mask, other=0.0).to(tl.float32)
    total = CG * S * 1.0  # float32 count (CG and S may be specialized to constexpr 1)
    mean = tl.sum(x) / total
    # Masked lanes must not enter Σ(x − mean)²: they hold 0, not mean.
    centred = tl.where(mask, x - mean, 0.0)
    # Corrected two-pass: Σ(x − mean) fixes the rounding of Σx / n (exact 0 for a constant group).
    corr = tl.sum(centred)
    rstd = 1.0 / tl.sqrt(tl.maximum(tl.sum(centred * centred) - corr * corr / total, 0.0) / total + eps)
    mean += corr / total
    centred = tl.where(mask, x - mean, 0.0)
    tl.store(mean_ptr + row, mean)
    tl.store(rstd_ptr + row, rstd)
    scale = rstd * tl.load(w_ptr + cs, mask=c_mask, other=0.0).to(tl.float32)
    shift = tl.load(b_ptr + cs, mask=c_mask, other=0.0).to(tl.float32)
    y = centred * scale[:, None] + shift[:, None]
    if HAS_RES:
        res_offs = _tile_offsets(cs, ss, C, S, RES_CHANNELS_LAST)
        y += tl.load(res_ptr + image + res_offs, mask=mask, other=0.0).to(tl.float32)
    if RELU:
        y = tl.where(y < 0.0, 0.0, y)  # not maximum(): keeps NaN like torch.relu
    tl.store(y_ptr + image + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


def _quick_bench(kernel_call, quantiles):
    # Memory-bound kernels of microseconds: 20 ms per candidate is plenty (default 125 ms).
    import triton.testing

    return triton.testing.do_bench(kernel_call, warmup=5, rep=20, quantiles=quantiles)


def tile_ok(block_c: int, block_s: int, c: int, s: int, channels_last: bool) -> bool:
    # Coalescing: NCHW tiles are wide along S (contiguous), channels-last tiles wide along C.
    if channels_last:
        return block_c == min(next_pow2(c), 128)
    return block_s == span(s)


def gpu_apply_configs() -> list[triton.Config]:
    """Every (channel × spatial) apply tile the GPU autotuner starts from: 2K tiles on 4 warps, 4K on 8."""
    pow2 = [2**i for i in range(11)]
    return [
        triton.Config({"BLOCK_C": bc, "BLOCK_S": bs}, num_warps=4 if bc * bs == 2048 else 8)
        for bc in pow2
        for bs in pow2
        if bc * bs in (2048, 4096)
    ]


# Under the interpreter: one small tile, so tests cover several programs and masked edges on both axes.
INTERPRETER_APPLY_CONFIG = triton.Config({"BLOCK_C": 16, "BLOCK_S": 32}, num_warps=4)


def prune_apply(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """The coalesced tiles for this (C, S, layout), none much larger than the tensor along either axis."""
    args = {**named_args, **kwargs}
    c, s, channels_last = args["C"], args["S"], args["CHANNELS_LAST"]
    fit = [cfg for cfg in configs if tile_ok(cfg.kwargs["BLOCK_C"], cfg.kwargs["BLOCK_S"], c, s, channels_last)]
    if not fit:
        return configs[:1]
    # Drop tiles much larger than the tensor along the other axis (all masked lanes).
    tight = [cfg for cfg in fit if cfg.kwargs["BLOCK_C"] <= next_pow2(c) and cfg.kwargs["BLOCK_S"] <= next_pow2(s)]
    return tight or [min(fit, key=lambda cfg: cfg.kwargs["BLOCK_C"] * cfg.kwargs["BLOCK_S"])]


APPLY_KEY = ["N", "C", "S", "CHANNELS_LAST"]


def tuned_apply(name: str, kernel):
    """`kernel` tuned over `gpu_apply_configs()` per GPU (kernels/_tuning.py: table, disk cache, prune)."""
    return tuned(name, kernel, gpu_apply_configs(), APPLY_KEY, prune_apply, INTERPRETER_APPLY_CONFIG, _quick_bench)


gn_apply_tuned = tuned_apply("group_norm_act_apply", _gn_apply)
