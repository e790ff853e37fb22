"""Tile configs of the flash-attention kernels (kernels/attention.py) and the prune that picks them per shape.

Each kernel kind has its own tiles: "fwd" (the forward), "dkdv" and "dq" (the two backward passes).
`select_configs` is pure, so the choice at every batch and sequence length is unit-tested on a CPU and
replayed offline for sm_80/sm_90 (kernels/_attention_offline.py).
"""

from __future__ import annotations

import triton

from ._runtime import SM80_SHARED_BYTES, device_limits
from ._tuning import tuned


def _config(block_m: int, block_n: int, num_warps: int, num_stages: int) -> triton.Config:
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=num_warps, num_stages=num_stages)


# (BLOCK_M, BLOCK_N, num_warps, num_stages), per kernel and precision. Few on purpose: each one the
# prune keeps is one more compile at a cold start. 16-bit forward for ViT-Base (D=64, N=577/197) on
# sm_80/sm_90: 128×64 tiles once B·H·cdiv(N, 128) programs fill the GPU, 64×64 at batch 1.
# Backward tiles are smaller: each dK/dV program keeps two fp32 (BLOCK_N, D) accumulators plus K and V
# in registers. float32 runs IEEE dots on the FMA units, where every thread holds whole head-dim rows of
# both operands: only 16×16 tiles over 8 warps stay under 255 registers without spilling (sm_80/sm_90,
# checked by tests/test_gpu_targets.py). Slow, but float32 is the parity path.
TILES = {
    "fwd": {
        "half": [(128, 64, 8, 3), (64, 64, 4, 3), (16, 16, 4, 1)],
        "fp32": [(16, 16, 8, 1)],
    },
    "dkdv": {
        "half": [(32, 128, 8, 2), (32, 64, 4, 3), (16, 16, 4, 1)],
        "fp32": [(16, 16, 8, 2)],
    },
    "dq": {
        "half": [(128, 32, 8, 2), (64, 64, 4, 2), (64, 32, 4, 3), (16, 16, 4, 1)],
        "fp32": [(16, 16, 8, 2)],
    },
}
# The tile each program owns (its grid axis): queries for fwd/dq, keys for dK/dV.
OWNED = {"fwd": "BLOCK_M", "dkdv": "BLOCK_N", "dq": "BLOCK_M"}
CONFIGS = {kind: [_config(*t) for t in dict.fromkeys(f["half"] + f["fp32"])] for kind, f in TILES.items()}
# The interpreter runs every program in Python: one mid-sized tile keeps tests fast and still makes
# N=130/197/577 cross several key blocks (online-softmax rescaling) and end in a partial block.
INTERPRETER_CONFIG = _config(32, 32, 4, 1)


def select_configs(
    kind: str, configs: list[triton.Config], n: int, head_dim: int, batch_heads: int, elem_bytes: int,
    sm_count: int,
) -> list[triton.Config]:  # fmt: skip
    """The tiles worth benchmarking for kernel `kind` at sequence length n and B·H = batch_heads.

    Only the dtype's family (16-bit or float32); tiles no wider than N's power-of-two bucket (else all
    padding); then the two largest whose B·H·cdiv(N, owned tile) programs fill every SM once, or when
    none does (batch 1) the two giving the most programs. Pure, for unit tests.
    """
    family = set(TILES[kind]["fp32" if elem_bytes >= 4 else "half"])
    bucket = n_bucket(n)
    fits = []
    for c in configs:
        bm, bn = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
        if (bm, bn, c.num_warps, c.num_stages) not in family or bm > bucket or bn > bucket:
            continue
        if elem_bytes < 4 and bm * bn <= 16 * 16 and bucket > 32:  # the tiny 16-bit tile is for tiny N only
            continue
        # A100's per-block shared memory, the smaller target (the compile checks hold each kept tile to
        # each GPU's own limit)
        if elem_bytes * head_dim * (bm + 2 * bn * max(c.num_stages, 1)) > SM80_SHARED_BYTES:
            continue
        programs = batch_heads * triton.cdiv(n, c.kwargs[OWNED[kind]])
        fits.append((programs, bm * bn, c))
    if not fits:
        return [min(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])]
    full = sorted((f for f in fits if f[0] >= sm_count), key=lambda f: (-f[1], f[0]))
    partial = sorted((f for f in fits if f[0] < sm_count), key=lambda f: (-f[0], -f[1]))
    return [f[2] for f in (full + partial)[:2]]


def _pruner(kind: str):
    def prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
        args = {**named_args, **kwargs}
        q = args["Q"]
        batch_heads = args["H"] * args["B_BUCKET"]
        return select_configs(kind, configs, args["N"], args["HEAD_DIM"], batch_heads, q.element_size(),
                              device_limits(q.device)[0])  # fmt: skip

    return prune


def autotuned(kind: str, kernel) -> object:
    """`kernel` of `kind` ("fwd", "dkdv" or "dq") behind its autotuner: the kind's tiles, pruned per shape."""
    # Triton appends every tensor argument's dtype to the key, so fp16/bf16/fp32 are tuned apart.
    return tuned(
        f"attention_{kind}", kernel, CONFIGS[kind], key=["N_BUCKET", "HEAD_DIM", "B_BUCKET"],
        prune=_pruner(kind), interpreter_config=INTERPRETER_CONFIG,
    )  # fmt: skip


def n_bucket(n: int) -> int:
    """N's power-of-two bucket (at least 16): the autotune key, and the widest tile worth trying."""
    return max(16, triton.next_power_of_2(n))
