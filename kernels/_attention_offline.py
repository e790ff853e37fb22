"""flash attention's launches at the base checkpoint's shapes, for the offline compile checks (kernels/_offline.py).

Each launch carries the kernel the launcher calls, every argument as the launcher passes it (strides
included: Triton specializes on them) and the tiles the prune keeps for each GPU of kernels/_offline.py.
"""

from __future__ import annotations

import torch
import triton

from ._attention_tiles import CONFIGS, select_configs
from ._offline import ARCHS, GPUS, HEADS, HIDDEN, TOKENS, Launch, TensorArg
from .attention import (
    _DELTA_BLOCK_M,
    LOG2E,
    _attn_bwd_delta,
    _attn_bwd_dkdv_tuned,
    _attn_bwd_dq_tuned,
    _attn_fwd_tuned,
    _dot_options,
)


def offline_launches(dtype: torch.dtype, batches: list[int], arch: int | None = None) -> list[Launch]:
    """The attention launches of the base checkpoint (N=577, 12 heads of 64), forward and backward.

    q, k, v are the packed-QKV views `FastSelfAttention.attend_packed` passes; o and dO are token-major;
    dQ/dK/dV contiguous — the strides Triton specializes on are the launcher's.
    """
    n, heads, d = TOKENS, HEADS, HIDDEN // HEADS
    t, f32 = TensorArg(dtype), TensorArg(torch.float32)
    elem = torch.empty((), dtype=dtype).element_size()
    packed = (n * 3 * HIDDEN, d, 3 * HIDDEN, 1)  # (B, N, 3, H, D) viewed as (B, H, N, D)
    token_major = (n * HIDDEN, d, HIDDEN, 1)
    dense = (heads * n * d, n * d, d, 1)

    def strides(prefix: str, values: tuple[int, ...]) -> dict[str, int]:
        return {f"stride_{prefix}{axis}": v for axis, v in zip("bhnd", values)}

    launches = []
    for batch in batches:
        opts = _dot_options(batch, n, d, dtype)
        opts["DOT_UPCAST"] = False

        def configs(kind: str, batch: int = batch) -> list[triton.Config]:
            kept: dict[str, triton.Config] = {}
            for a in [arch] if arch is not None else list(ARCHS.values()):
                sm_count = GPUS[a][0]
                for c in select_configs(kind, CONFIGS[kind], n, d, batch * heads, elem, sm_count):
                    kept[repr(c)] = c
            return list(kept.values())

        qkv = {**strides("q", packed), **strides("k", packed), **strides("v", packed)}
        fwd = dict(Q=t, K=t, V=t, O=t, LSE=f32, **qkv, **strides("o", token_major), H=heads,
                   qk_scale=d**-0.5 * LOG2E, **opts)  # fmt: skip
        launches.append(Launch("attention forward", _attn_fwd_tuned, fwd, configs("fwd")))
        delta = dict(O=t, DO=t, DELTA=f32, **strides("o", token_major), **strides("do", token_major), H=heads, N=n,
                     HEAD_DIM=d, BLOCK_M=_DELTA_BLOCK_M)  # fmt: skip
        launches.append(Launch("attention backward delta", _attn_bwd_delta, delta, [triton.Config({})], "backward"))
        bwd = dict(Q=t, K=t, V=t, DO=t, LSE=f32, DELTA=f32, **qkv, **strides("do", token_major),
                   **strides("g", dense), H=heads, qk_scale=d**-0.5 * LOG2E, sm_scale=d**-0.5, **opts)  # fmt: skip
        launches.append(Launch("attention backward dk/dv", _attn_bwd_dkdv_tuned, dict(DK=t, DV=t, **bwd),
                               configs("dkdv"), "backward"))  # fmt: skip
        launches.append(Launch("attention backward dq", _attn_bwd_dq_tuned, dict(DQ=t, **bwd), configs("dq"),
                               "backward"))  # fmt: skip
    return launches
