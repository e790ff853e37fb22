"""GroupNorm + affine + optional residual + optional ReLU: act(GN(x)·w + b [+ residual]).

BiT's `BitGroupNormActivation` (32 groups, eps 1e-5), and with a residual the bottleneck tail
`relu(norm3(conv3(h)) + shortcut)`. Per image at 384²: stem (64, 192²); stage 1 (64|256, 96²); stage 2
(128|512, 48²); stage 3 (256|1024, 24²): one (n, g) group holds 4,608 … 73,728 elements.

Shapes: x (N, C, *spatial), S = prod(spatial); weight, bias (C,) or None; residual like x. Dtypes:
float32/float16/bfloat16, all math in float32, output in x.dtype. Layouts: NCHW-contiguous and
channels-last (any spatial rank) x and residual are read in place, each in its own layout; the output
has x's layout. Other strides are copied first.

Forward, single pass (1 read of x, 1 of residual, 1 write), when one (n, g) group fits on chip (its
padded (C/G, S) tile ≤ SINGLE_PASS_MAX_TILE elements) and the N·G programs fill the GPU (≥ 2 per SM):
`_gn_fwd_single_pass` loads the whole group into float32 registers, takes mean then Σ(x − mean)² on
them (exact two-pass), and writes act((x − mean)·rstd·w + b [+ residual]). At large batch this lifts
the bandwidth ceiling from 2/3 (3/4 with a residual) of HBM to ~1; at small N·G the split path below
is kept (its second read of x hits L2 anyway). Both paths save the same (N, G) float32 mean and rstd.

Forward, split (2 reads of x, 1 of residual, 1 write):
1. `_gn_stats`: (channel × S-chunk) tiles of one image; per (n, c, chunk) the chunk mean and centred
   sum of squares M2. Each BLOCK_S block's M2 is an exact two-pass Σ(x − block mean)² on registers and
   blocks merge with Chan's parallel formula, so the variance never comes from E[x²] − E[x]² (which
   loses every digit in float32 when |mean| ≫ std). Chunks split S until there are ≥ 4 programs per SM.
2. `_gn_finalize`: one program per (n, g) merges its C/G · chunks partials (Chan again: Σ M2 +
   Σ cnt·(mean_i − mean)²) into float32 mean and rstd.
3. `_gn_apply`: (x − mean)·rstd·w + b [+ residual] [relu] on (channel × spatial) tiles; per-channel
   factors load once per tile. x − mean is formed before scaling (no folded shift) for |mean| ≫ std.
Backward (Triton; kernels/_group_norm_act_backward.py): a per-channel Σ gz, Σ gz·x̂ reduction, then
dx = rstd·(w·gz − mean(gz·w) − x̂·mean(gz·w·x̂)) and d residual = gz, gz = gy·[y > 0].

Limits: < 2³¹ elements per image. Reduction tiles/chunking are heuristics (warps autotuned); apply tiles
are autotuned on the GPU. Loop trip counts are constexpr (the Triton 3.6 interpreter cannot loop to a
runtime bound), so each distinct chunking compiles once.

Entry point: `group_norm_act(...)`, backed by the torch custom ops `vithybrid::group_norm_act` and
`vithybrid::group_norm_act_backward`, so torch.compile traces a model calling it without a graph break.
No double backward.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ._runtime import check_launchable, interpreter_enabled, needs_registered_op

ACTIVATIONS = ("relu", None)


def reference(
    x: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float = 1e-5,
    act: str | None = "relu",
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """Plain-torch twin: float32 math (float64 for a float64 input), result in x.dtype."""
    compute = torch.promote_types(x.dtype, torch.float32)
    w = None if weight is None else weight.to(compute)
    b = None if bias is None else bias.to(compute)
    y = torch.nn.functional.group_norm(x.to(compute), num_groups, w, b, eps)
    if residual is not None:
        y = y + residual.to(compute)
    if act == "relu":
        y = torch.relu(y)
    elif act is not None:
        raise ValueError(f"group_norm_act: act must be 'relu' or None, got {act!r}")
    return y.to(x.dtype)


@triton.jit
def _tile_offsets(cs, ss, C, S, CHANNELS_LAST: tl.constexpr):
    # (BLOCK_C, BLOCK_S) element offsets inside one image: NCHW c·S + s, channels-last s·C + c.
    if CHANNELS_LAST:
        offs = ss[None, :] * C + cs[:, None]
    else:
        offs = cs[:, None] * S + ss[None, :]
    return offs


@triton.jit
def _gn_stats(
    x_ptr,  # (N, C, S) input in either layout
    part_mean_ptr,  # (N, C, P) float32 out: chunk means
    part_m2_ptr,  # (N, C, P) float32 out: chunk centred sums of squares
    C,
    S,
    P,  # chunks per channel
    CHANNELS_LAST: tl.constexpr,
    ITERS: tl.constexpr,  # BLOCK_S blocks per chunk
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    chunk, n, pid_c = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    x_ptr += n.to(tl.int64) * C * S
    cs = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = cs < C
    mean = tl.zeros([BLOCK_C], dtype=tl.float32)
    m2 = tl.zeros([BLOCK_C], dtype=tl.float32)
    chunk_start = chunk * ITERS * BLOCK_S
    for it in range(ITERS):
        s0 = chunk_start + it * BLOCK_S
        ss = s0 + tl.arange(0, BLOCK_S)
        mask = c_mask[:, None] & (ss < S)[None, :]
        x = tl.load(x_ptr + _tile_offsets(cs, ss, C, S, CHANNELS_LAST), mask=mask, other=0.0).to(tl.float32)
        # Element counts are the same for every channel of the tile; `seen` is what is already merged.
        n_blk = tl.minimum(tl.maximum(S - s0, 0), BLOCK_S).to(tl.float32)
        seen = tl.minimum(tl.maximum(S - chunk_start, 0), it * BLOCK_S).to(tl.float32)
        blk_mean = tl.sum(x, axis=1) / tl.maximum(n_blk, 1.0)
        centred = tl.where(mask, x - blk_mean[:, None], 0.0)
        blk_m2 = tl.sum(centred * centred, axis=1)
        frac = n_blk / tl.maximum(seen + n_blk, 1.0)
        delta = blk_mean - mean
        mean += delta * frac
        m2 += blk_m2 + delta * delta * seen * frac
    dst = (n * C + cs) * P + chunk
    tl.store(part_mean_ptr + dst, mean, mask=c_mask)
    tl.store(part_m2_ptr + dst, m2, mask=c_mask)


@triton.jit
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
    E_ITERS: tl.constexpr,  # cdiv(CG · P, BLOCK_E)
    BLOCK_E: tl.constexpr,
):
    row = tl.program_id(0)  # n·G + g; its CG·P partials are contiguous at (n·C + g·CG)·P
    n_entries = CG * P
    base = row.to(tl.int64) * n_entries
    total = CG * S * 1.0  # float32 count (CG and S may be specialized to constexpr 1)
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


@triton.jit
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
    pid_s, n, pid_c = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    image = n.to(tl.int64) * C * S
    cs = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    ss = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    c_mask = cs < C
    mask = c_mask[:, None] & (ss < S)[None, :]
    grp = n * G + cs // CG
    mean = tl.load(mean_ptr + grp, mask=c_mask, other=0.0)
    scale = tl.load(rstd_ptr + grp, mask=c_mask, other=0.0) * tl.load(w_ptr + cs, mask=c_mask).to(tl.float32)
    shift = tl.load(b_ptr + cs, mask=c_mask).to(tl.float32)
    offs = _tile_offsets(cs, ss, C, S, CHANNELS_LAST)
    x = tl.load(x_ptr + image + offs, mask=mask, other=0.0).to(tl.float32)
    y = (x - mean[:, None]) * scale[:, None] + shift[:, None]
    if HAS_RES:
        res_offs = _tile_offsets(cs, ss, C, S, RES_CHANNELS_LAST)
        y += tl.load(res_ptr + image + res_offs, mask=mask, other=0.0).to(tl.float32)
    if RELU:
        y = tl.where(y < 0.0, 0.0, y)  # not maximum(): keeps NaN like torch.relu
    tl.store(y_ptr + image + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
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
    rstd = 1.0 / tl.sqrt(tl.sum(centred * centred) / total + eps)
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


def _span(s: int) -> int:
    """NCHW tile width along S: the widest power of two in 64..512 padding S within 10% of the least."""
    if s < 64:
        return triton.next_power_of_2(s)
    padded = {b: triton.cdiv(s, b) * b for b in (64, 128, 256, 512)}
    return max(b for b, p in padded.items() if p <= 1.1 * min(padded.values()))


def _tile_ok(block_c: int, block_s: int, c: int, s: int, channels_last: bool) -> bool:
    # Coalescing: NCHW tiles are wide along S (contiguous), channels-last tiles wide along C.
    if channels_last:
        return block_c == min(triton.next_power_of_2(c), 128)
    return block_s == _span(s)


def _apply_configs() -> list[triton.Config]:
    if interpreter_enabled():
        # One small tile so tests cover several programs and masked edges on both axes.
        return [triton.Config({"BLOCK_C": 16, "BLOCK_S": 32}, num_warps=4)]
    pow2 = [2**i for i in range(11)]
    return [
        triton.Config({"BLOCK_C": bc, "BLOCK_S": bs}, num_warps=w)
        for bc in pow2
        for bs in pow2
        if bc * bs in (1024, 2048, 4096)
        for w in (4, 8)
    ]


def _prune_apply(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    args = {**named_args, **kwargs}
    c, s, channels_last = args["C"], args["S"], args["CHANNELS_LAST"]
    fit = [cfg for cfg in configs if _tile_ok(cfg.kwargs["BLOCK_C"], cfg.kwargs["BLOCK_S"], c, s, channels_last)]
    if not fit:
        return configs[:1]
    # Drop tiles much larger than the tensor along the other axis (all masked lanes).
    tight = [
        cfg
        for cfg in fit
        if cfg.kwargs["BLOCK_C"] <= triton.next_power_of_2(c) and cfg.kwargs["BLOCK_S"] <= triton.next_power_of_2(s)
    ]
    return tight or [min(fit, key=lambda cfg: cfg.kwargs["BLOCK_C"] * cfg.kwargs["BLOCK_S"])]


_APPLY_KEY = ["N", "C", "S", "CHANNELS_LAST"]
_apply_kw = {"key": _APPLY_KEY, "do_bench": _quick_bench}
if not interpreter_enabled():
    _apply_kw["prune_configs_by"] = {"early_config_prune": _prune_apply}
_gn_apply_tuned = triton.autotune(configs=_apply_configs(), **_apply_kw)(_gn_apply)
# The reductions' tiles come from _reduce_plan (the partials' layout depends on them): tune warps only.
_reduce_kw = {
    "configs": [triton.Config({}, num_warps=w) for w in ((4,) if interpreter_enabled() else (4, 8))],
    "key": ["C", "S", "P", "CHANNELS_LAST", "ITERS", "BLOCK_C", "BLOCK_S"],
    "do_bench": _quick_bench,
}
_gn_stats_tuned = triton.autotune(**_reduce_kw)(_gn_stats)


@functools.lru_cache(maxsize=16)
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _reduce_plan(n: int, c: int, s: int, channels_last: bool, device: torch.device) -> tuple[int, int, int, int]:
    """(BLOCK_C, BLOCK_S, ITERS, P) for the per-channel reductions: ~2K-element tiles, enough programs."""
    if interpreter_enabled():
        # Tiny tiles and few chunks: the tests then exercise masking and the Chan merge loop.
        block_c, block_s, target = min(triton.next_power_of_2(c), 8), min(triton.next_power_of_2(s), 16), 4
    else:
        if channels_last:
            block_c = min(triton.next_power_of_2(c), 128)
            block_s = min(max(2048 // block_c, 1), triton.next_power_of_2(s))
        else:
            block_s = _span(s)
            block_c = min(max(2048 // block_s, 1), triton.next_power_of_2(c))
        target = 4 * _sm_count(device)
    s_blocks = triton.cdiv(s, block_s)
    chunks = min(max(triton.cdiv(target, n * triton.cdiv(c, block_c)), 1), s_blocks)
    iters = triton.cdiv(s_blocks, chunks)
    return block_c, block_s, iters, triton.cdiv(s_blocks, iters)


# Single-pass forward: largest padded group tile (C/G × S, each a power of two) held in registers, and
# the least N·G programs per SM that keep HBM busy (fewer: the split path's second read of x is in L2).
SINGLE_PASS_MAX_TILE = 16384
SINGLE_PASS_MIN_PROGRAMS_PER_SM = 2
# Tests set this to "single" or "split" to force a forward path; None chooses by `_use_single_pass`.
_FORCE_PATH: str | None = None


def _single_pass_tile(cg: int, s: int) -> tuple[int, int]:
    return triton.next_power_of_2(cg), triton.next_power_of_2(s)


def _use_single_pass(n: int, num_groups: int, cg: int, s: int, device: torch.device) -> bool:
    """Whether the forward takes the single-pass kernel (one program per (n, g), x read once)."""
    if _FORCE_PATH is not None:
        if _FORCE_PATH not in ("single", "split"):
            raise ValueError(f"group_norm_act: _FORCE_PATH must be 'single', 'split' or None, got {_FORCE_PATH!r}")
        return _FORCE_PATH == "single"
    block_cg, block_s = _single_pass_tile(cg, s)
    if block_cg * block_s > SINGLE_PASS_MAX_TILE:
        return False
    sm_count = 1 if interpreter_enabled() else _sm_count(device)
    return n * num_groups >= SINGLE_PASS_MIN_PROGRAMS_PER_SM * sm_count


def _layout(t: torch.Tensor) -> bool | None:
    """False: NCHW-contiguous, True: channels-last dense, None: neither."""
    if t.is_contiguous():
        return False
    if t.dim() >= 3 and t.movedim(1, -1).is_contiguous():
        return True
    return None


def _to_layout(t: torch.Tensor, channels_last: bool) -> torch.Tensor:
    if _layout(t) == channels_last:
        return t
    return t.movedim(1, -1).contiguous().movedim(-1, 1) if channels_last else t.contiguous()


def _check(x, num_groups, weight, bias, act, residual) -> None:
    name = "group_norm_act"
    check_launchable(name, *(t for t in (x, weight, bias, residual) if t is not None))
    if x.dim() < 2:
        raise ValueError(f"{name}: x must be (N, C, *spatial), got shape {tuple(x.shape)}")
    c = x.shape[1]
    if num_groups <= 0 or c % num_groups != 0:
        raise ValueError(f"{name}: channels C={c} must be divisible by num_groups={num_groups}")
    for label, t in (("weight", weight), ("bias", bias)):
        if t is not None and tuple(t.shape) != (c,):
            raise ValueError(f"{name}: {label} must have shape ({c},), got {tuple(t.shape)}")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"{name}: residual shape {tuple(residual.shape)} != x shape {tuple(x.shape)}")
    if act not in ACTIVATIONS:
        raise ValueError(f"{name}: act must be 'relu' or None, got {act!r}")
    if x.numel() // max(x.shape[0], 1) >= 2**31:
        raise ValueError(f"{name}: at most 2^31 elements per image are supported")


def _dense(x: torch.Tensor) -> torch.Tensor:
    """x itself if NCHW-contiguous or channels-last dense, else a contiguous copy (the layout y takes)."""
    return x if _layout(x) is not None else x.contiguous()


def launch_forward(x, num_groups, weight, bias, eps, act, residual):
    """Launch only (no checks): single pass or the three split passes, (y, mean, rstd); y in `_dense(x)`'s layout."""
    x = _dense(x)
    channels_last = bool(_layout(x))
    n, c = x.shape[0], x.shape[1]
    s = x.numel() // max(n * c, 1)
    weight = torch.ones(c, device=x.device, dtype=x.dtype) if weight is None else weight
    bias = torch.zeros(c, device=x.device, dtype=x.dtype) if bias is None else bias
    mean = torch.empty(n, num_groups, device=x.device, dtype=torch.float32)
    rstd = torch.empty_like(mean)
    y = torch.empty_like(x)  # preserve_format: channels-last in, channels-last out
    if x.numel() == 0:
        return y, mean, rstd
    res_channels_last = False
    if residual is not None:
        res_channels_last = _layout(residual)
        if res_channels_last is None:
            residual, res_channels_last = _to_layout(residual, channels_last), channels_last
    cg = c // num_groups
    if _use_single_pass(n, num_groups, cg, s, x.device):
        block_cg, block_s = _single_pass_tile(cg, s)
        tile = block_cg * block_s
        _gn_fwd_single_pass[(n * num_groups,)](
            x, x if residual is None else residual, y, weight, bias, mean, rstd, c, s, num_groups, cg, eps,
            HAS_RES=residual is not None, RELU=act == "relu",
            CHANNELS_LAST=channels_last, RES_CHANNELS_LAST=res_channels_last,
            BLOCK_CG=block_cg, BLOCK_S=block_s, num_warps=16 if tile >= 8192 else (8 if tile >= 2048 else 4),
        )  # fmt: skip
        return y, mean, rstd
    block_c, block_s, iters, chunks = _reduce_plan(n, c, s, channels_last, x.device)
    part_mean = torch.empty(n * c * chunks, device=x.device, dtype=torch.float32)
    part_m2 = torch.empty_like(part_mean)
    stats_grid = (chunks, n, triton.cdiv(c, block_c))
    _gn_stats_tuned[stats_grid](
        x, part_mean, part_m2, c, s, chunks,
        CHANNELS_LAST=channels_last, ITERS=iters, BLOCK_C=block_c, BLOCK_S=block_s,
    )  # fmt: skip
    block_e = min(triton.next_power_of_2(cg * chunks), 2048)
    _gn_finalize[(n * num_groups,)](
        part_mean, part_m2, mean, rstd, s, chunks, iters * block_s, eps,
        CG=cg, E_ITERS=triton.cdiv(cg * chunks, block_e), BLOCK_E=block_e,
    )  # fmt: skip

    def grid(meta: dict) -> tuple[int, int, int]:
        return (triton.cdiv(s, meta["BLOCK_S"]), n, triton.cdiv(c, meta["BLOCK_C"]))

    _gn_apply_tuned[grid](
        x, x if residual is None else residual, y, weight, bias, mean, rstd, n, c, s, num_groups, cg,
        HAS_RES=residual is not None, RELU=act == "relu",
        CHANNELS_LAST=channels_last, RES_CHANNELS_LAST=res_channels_last,
    )  # fmt: skip
    return y, mean, rstd


# Custom ops (as in kernels/attention.py): torch.compile sees one opaque node per call, no graph break.
# The fake (meta) implementations allocate exactly as the launchers do (`torch.empty_like(_dense(x))`),
# so a channels-last x gives a channels-last output under the compiler too.
@torch.library.custom_op("vithybrid::group_norm_act", mutates_args=())
def _group_norm_act_op(
    x: torch.Tensor, num_groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float,
    act: str | None, residual: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    return launch_forward(x, num_groups, weight, bias, eps, act, residual)


@_group_norm_act_op.register_fake
def _(x, num_groups, weight, bias, eps, act, residual):
    stats = x.new_empty((x.shape[0], num_groups), dtype=torch.float32)
    return torch.empty_like(_dense(x)), stats, torch.empty_like(stats)


@torch.library.custom_op("vithybrid::group_norm_act_backward", mutates_args=())
def _group_norm_act_backward_op(
    gy: torch.Tensor, y: torch.Tensor | None, x: torch.Tensor, weight: torch.Tensor | None, mean: torch.Tensor,
    rstd: torch.Tensor, relu: bool, need_gz: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """(dx, d residual, dw, db); d residual is an empty placeholder unless `need_gz and relu` (else it is gy)."""
    # Imported here: the backward module builds on this module's helpers (tiles, layouts, plans).
    from ._group_norm_act_backward import launch_backward

    gx, gz, dw, db = launch_backward(gy, y, x, weight, mean, rstd, relu, need_gz and relu)
    return gx, (x.new_empty(0) if gz is None else gz), dw, db


@_group_norm_act_backward_op.register_fake
def _(gy, y, x, weight, mean, rstd, relu, need_gz):
    dense = _dense(x)
    sums = x.new_empty(x.shape[1], dtype=torch.float32)
    gz = torch.empty_like(dense) if need_gz and relu else x.new_empty(0)
    return torch.empty_like(dense), gz, sums, torch.empty_like(sums)


def _setup_context(ctx, inputs, output) -> None:
    x, _, weight, bias, _, act, _ = inputs
    y, mean, rstd = output
    ctx.relu = act == "relu"
    ctx.w_dtype = None if weight is None else weight.dtype
    ctx.b_dtype = None if bias is None else bias.dtype
    ctx.save_for_backward(x, weight, mean, rstd, y if ctx.relu else None)


def _backward_rule(ctx, gy, grad_mean, grad_rstd):
    # mean and rstd are internal by-products (never handed to users): their gradients are ignored.
    x, weight, mean, rstd, y = ctx.saved_tensors
    need_res = ctx.needs_input_grad[6]
    gx, gres, dw, db = _group_norm_act_backward_op(gy, y, x, weight, mean, rstd, ctx.relu, need_res)
    if need_res and not ctx.relu:
        gres = gy  # no activation: d residual = dL/dy
    dw = dw.to(ctx.w_dtype) if ctx.w_dtype is not None and ctx.needs_input_grad[2] else None
    db = db.to(ctx.b_dtype) if ctx.b_dtype is not None and ctx.needs_input_grad[3] else None
    return gx, None, dw, db, None, None, gres if need_res else None


_group_norm_act_op.register_autograd(_backward_rule, setup_context=_setup_context)


def group_norm_act(
    x: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float = 1e-5,
    act: str | None = "relu",
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """act(GroupNorm(x) [+ residual]) on (N, C, *spatial), NCHW or channels-last; output keeps x's layout.

    Differentiable w.r.t. x, weight, bias and residual (Triton backward). Backed by the torch custom op
    `vithybrid::group_norm_act`, so torch.compile traces it without a graph break.
    """
    _check(x, num_groups, weight, bias, act, residual)
    if not needs_registered_op(x, weight, bias, residual):
        return launch_forward(x, int(num_groups), weight, bias, float(eps), act, residual)[0]
    return _group_norm_act_op(x, int(num_groups), weight, bias, float(eps), act, residual)[0]
