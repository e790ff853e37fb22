"""Tile configs of the fused-linear GEMM (kernels/fused_linear.py) and the prune that picks them per shape.

`select_configs` is pure, so the choice at every (M, N) is unit-tested on a CPU and replayed offline for
sm_80/sm_90 (kernels/_fused_linear_offline.py). bench/sweep_fused_linear.py times candidates beyond these.
"""

from __future__ import annotations

from collections.abc import Sequence

import triton

from ._runtime import SM80_SHARED_BYTES, device_limits

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages). Few tiles on purpose: every distinct epilogue
# (qkv, out-proj/fc2, fc1) compiles each tile the prune keeps, and a cold start pays for all of them.
# 16-bit: 128×128 for the large batches (M = 577·B ≥ 4616 fills the 108/132 SMs), 64×64 for batch 1-2
# where bigger tiles would leave most SMs idle. (A 128×64 tile in between cost 3 more compiles at a cold
# start, over the 60 s budget on a loaded 2-core machine.)
HALF_TILES = [
    (128, 128, 64, 8, 3),
    (64, 64, 64, 4, 4),
]
# float32 (IEEE dots on the FMA units, no tensor cores): small tiles, so nothing spills to local memory.
FP32_TILES = [
    (64, 64, 32, 4, 2),
    (32, 64, 32, 4, 2),
]


def _config(bm: int, bn: int, bk: int, warps: int, stages: int) -> triton.Config:
    return triton.Config(
        {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=warps, num_stages=stages
    )


GPU_CONFIGS = [_config(*t) for t in HALF_TILES + FP32_TILES]
INTERPRETER_CONFIG = triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 4}, num_warps=4)


def select_configs(
    configs: Sequence[triton.Config], m: int, n: int, elem_bytes: int, sm_count: int, smem: int = SM80_SHARED_BYTES
) -> list[triton.Config]:
    """The tiles worth benchmarking for an (m × n) output on a GPU with `sm_count` SMs.

    float32 gets only the float32 tiles, 16-bit only the tensor-core ones. Of the tiles whose pipelined
    A/B stages fit `smem`, keep the two largest that still give every SM a tile (one full wave),
    topped up (batch 1, narrow N) with those giving the most tiles. Pure, for unit tests.
    """
    shapes = set(FP32_TILES if elem_bytes >= 4 else HALF_TILES)
    fits = []
    for cfg in configs:
        bm, bn, bk = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"], cfg.kwargs["BLOCK_K"]
        if (bm, bn, bk, cfg.num_warps, cfg.num_stages) not in shapes:
            continue
        if (bm + bn) * bk * elem_bytes * max(cfg.num_stages, 1) > smem:
            continue
        fits.append((triton.cdiv(m, bm) * triton.cdiv(n, bn), bm * bn, cfg))
    if not fits:
        return list(configs[-1:])
    full = sorted((f for f in fits if f[0] >= sm_count), key=lambda f: (-f[1], f[0]))
    partial = sorted((f for f in fits if f[0] < sm_count), key=lambda f: (-f[0], -f[1]))
    return [f[2] for f in (full + partial)[:2]]


def prune_configs(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    x = named_args["x_ptr"]
    sm_count, smem = device_limits(x.device)
    return select_configs(configs, named_args["M"], named_args["N"], x.element_size(), sm_count, smem)
